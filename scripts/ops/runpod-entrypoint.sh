#!/bin/sh
# Entrypoint of the RunPod image (Dockerfile.runpod): run the worker as the unprivileged user `sd`, with a
# writable weights cache.
#
# RunPod mounts the network volume at /runpod-volume owned by root, and the worker caches weights there
# (SD_CACHE_DIR; sd_core.settings picks /runpod-volume/sd-cache when the volume exists). Started as root (the
# image default), this script creates the cache folder, gives it to `sd`, and runs the command as `sd`. When the
# folder still is not writable for `sd` (a volume that refuses chown), the worker runs as root and says so: a
# worker that cannot cache its weights cannot start. Started as any other user (`docker run --user ...`), it only
# runs the command.
set -eu

if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi

sd_home=$(getent passwd sd | cut -d: -f6)
as_sd() { HOME=$sd_home setpriv --reuid=sd --regid=sd --init-groups -- "$@"; }

# The cache path comes from the worker's own settings (the one place that reads the environment), as `sd` sees it.
cache_dir=$(HOME=$sd_home python -c 'from sd_core.settings import Settings; print(Settings.from_env().cache_dir)')

# Made by `sd` where it can (its home); else by root, then handed over: only entries not yet owned by `sd` (a warm
# volume is mostly right already; chown there is metadata only).
as_sd mkdir -p "$cache_dir" 2>/dev/null || mkdir -p "$cache_dir" 2>/dev/null || true
find "$cache_dir" ! -user sd -exec chown sd:sd {} + 2>/dev/null || true

if as_sd test -w "$cache_dir" -a -x "$cache_dir"; then
    export HOME="$sd_home"
    exec setpriv --reuid=sd --regid=sd --init-groups -- "$@"
fi

echo "runpod-entrypoint: weights cache $cache_dir is not writable by user sd; running the worker as root" >&2
exec "$@"
