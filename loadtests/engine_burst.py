"""Burst test of AsyncEngine alone: N concurrent requests (128-token prompts, 128 generated,
greedy, no EOS), two rounds, printing tok/s, errors and peak memory. Used to check that the engine
survives 256 rows at once on a GPU.

    python loadtests/engine_burst.py MODEL_DIR 256
"""
import asyncio, sys, time, random, logging, traceback
logging.basicConfig(level=logging.WARNING)
import parallm
from parallm.models import load
from parallm.engine.async_engine import AsyncEngine
from parallm.engine.engine import EngineConfig
from parallm.engine.types import EngineRequest, SamplingParams
import mlx.core as mx
loaded = load(sys.argv[1])
N = int(sys.argv[2])
eng = AsyncEngine(loaded, EngineConfig(max_num_seqs=N, max_queue=4*N))
async def one(i):
    r = random.Random(i)
    ids = [r.randrange(100, 40000) for _ in range(128)]
    req = EngineRequest(request_id=f"r{i}", prompt_token_ids=ids, sampling=SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))
    n = 0
    async for out in eng.generate(req):
        n += len(out.token_ids)
    return n
async def main():
    await eng.start()
    for rnd in range(2):
        t = time.time()
        res = await asyncio.gather(*[one(rnd*10000+i) for i in range(N)], return_exceptions=True)
        errs = [r for r in res if isinstance(r, Exception)]
        toks = sum(r for r in res if isinstance(r, int))
        print("round", rnd, "s", round(time.time()-t,2), "tok/s", round(toks/(time.time()-t),1), "errors", len(errs), [repr(e)[:800] for e in errs[:1]], eng.stats(), "peak_mem_GB", mx.get_peak_memory()/1e9, flush=True)
    await eng.shutdown()
asyncio.run(main())
