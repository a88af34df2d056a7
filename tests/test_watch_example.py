"""examples/watch.py: the live watch of the README's "Streaming" section runs, and its store behaves."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import anyio
import pytest

import kubrpc

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).parent.parent / "examples" / "watch.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_watch_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


watch = _example()


@pytest.mark.parametrize("transport", ["inproc", "tcp", "http"])
async def test_the_example_runs(transport: str, tmp_path: Path) -> None:
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, str(EXAMPLE), "--transport", transport], check=False, cwd=tmp_path
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"serving kv.Store on {transport}://")
    config = [line for line in lines if line.startswith("[config] ")]
    everything = [line for line in lines if line.startswith("[all] ")]
    assert config == [
        "[config] put config/mode = 'fast' (revision 1)",
        "[config] synced at revision 1",
        "[config] put config/mode = 'safe' (revision 2)",
        "[config] delete config/mode (revision 4)",
        "[config] put config/retries = '3' (revision 6)",
    ]
    assert everything[2:] == [
        "[all] put config/mode = 'safe' (revision 2)",
        "[all] put users/ada = 'admin' (revision 3)",
        "[all] delete config/mode (revision 4)",
        "[all] put users/bob = 'reader' (revision 5)",
        "[all] put config/retries = '3' (revision 6)",
    ]
    assert "loaded 2 entries: revision 6" in lines and lines[-1] == "config/retries = '3'"


async def test_a_watcher_that_does_not_read_is_ended_and_puts_never_wait() -> None:
    server = kubrpc.Server(drain_timeout=1)
    impl = watch.StoreImpl(backlog=4)
    server.register(watch.Store, impl)
    async with server.serve("inproc://watch-lag") as listener, kubrpc.connect(listener.url) as channel:
        store = channel.stub(watch.Store, timeout=30)
        changes = store.watch("k")
        first = await changes.__anext__()
        assert (first.kind, first.revision) == ("synced", 0)
        with anyio.fail_after(30):
            for i in range(2000):  # far more than the backlog and any stream window: the watcher falls behind
                await store.put(f"k{i}", "v")
        seen = []
        with pytest.raises(kubrpc.RpcError) as info:
            async for change in changes:
                seen.append(change.revision)  # noqa: PERF401 (those read before the error are the point)
        assert info.value.code is kubrpc.Status.RESOURCE_EXHAUSTED and "watch again" in info.value.message
        assert seen == list(range(1, len(seen) + 1)) and len(seen) < 2000  # in order, up to where it fell behind
        assert not impl._watchers  # unsubscribed
        again = store.watch("k9", initial=False)
        assert (await again.__anext__()).kind == "synced"
        await store.put("k9", "new")
        assert (await again.__anext__()).value == "new"
        await again.aclose()
