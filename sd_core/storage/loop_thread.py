"""One asyncio event loop on its own thread: a transfer's part downloads run on it as tasks (obstore's async reads)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future


class LoopThread:
    """An event loop running on a daemon thread until `close()`; `submit(coro)` schedules a task on it and returns a
    concurrent.futures.Future, so the caller waits on it as on a thread pool's."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        """Wait until the tasks still running have ended (the caller has told them to stop), then stop the loop and
        its thread. Not cancelled: a task ends where it would in a thread, so the connection it was reading is closed
        (its stream dropped) before close returns, as a thread pool's shutdown(wait=True) does."""
        async def drain() -> None:
            await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not asyncio.current_task()),
                                 return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(drain(), self.loop).result()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()
