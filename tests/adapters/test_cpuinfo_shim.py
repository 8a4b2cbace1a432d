"""The RunPod adapter imports runpod without py-cpuinfo's subprocess, and runpod still gets py-cpuinfo's CPU name."""

import json
import subprocess
import sys
from pathlib import Path

import cpuinfo
import pytest
from cpuinfo import cpuinfo as cpuinfo_impl

from sd_core.cpuinfo_shim import BRAND_FIELDS, cpu_brand_in_process, in_process_brand

ROOT = Path(__file__).resolve().parents[2]

SAMPLES = {
    "x86": "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
           "model name\t: AMD EPYC 7R13 Processor\nstepping\t: 1\n",
    "power": "processor\t: 0\ncpu\t\t: POWER9 (architected), altivec supported\nclock\t\t: 2200.000000MHz\n",
    "arm, no name": "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n",
    "empty value first": "model name\t:\nprocessor\t: 7\nuarch\t: sifive,u74-mc\n",
}


@pytest.mark.parametrize("name", SAMPLES)
def test_brand_parsed_as_py_cpuinfo_parses_proc_cpuinfo(name):
    text = SAMPLES[name]
    assert in_process_brand(text) == cpuinfo_impl._get_field(True, text, None, None, *BRAND_FIELDS)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_same_brand_as_the_real_py_cpuinfo_on_this_machine():
    assert in_process_brand() == cpuinfo.get_cpu_info()["brand_raw"]  # the real call: its second process


def test_py_cpuinfo_restored_after_the_block():
    original = cpuinfo.get_cpu_info
    with cpu_brand_in_process():
        assert cpuinfo.get_cpu_info is not original
        if in_process_brand() is not None:
            assert cpuinfo.get_cpu_info() == {"brand_raw": in_process_brand()}
    assert cpuinfo.get_cpu_info is original


PROBE = """
import json, subprocess, sys
started = []
real = subprocess.Popen.__init__
def spy(self, args, *a, **k):
    started.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
    return real(self, args, *a, **k)
subprocess.Popen.__init__ = spy
import cpuinfo
original = cpuinfo.get_cpu_info
import handler
from runpod.serverless.utils import rp_debugger
print(json.dumps({"started": started, "processor": rp_debugger.PROCESSOR,
                  "restored": cpuinfo.get_cpu_info is original}))
"""


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_import_handler_starts_no_process_and_runpod_gets_the_cpu_name():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    # before: `python .../cpuinfo.py --json` (a second interpreter, which runs cat, lscpu, dmesg, ... itself); other
    # packages' cheap probes (platform's `uname -p`, `file -b`) are not py-cpuinfo's
    assert [command for command in seen["started"] if "cpuinfo" in command] == []
    assert seen["processor"] == in_process_brand()
    assert seen["restored"]
