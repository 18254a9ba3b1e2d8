"""Issue 11 item 1: warm-up at load leaves no trace but its cost."""

from specem_fast import Ensemble

from known_outputs import PROMPTS


def test_warmup_changes_no_result_weight_or_counter(tiny_dirs):
    names = [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]
    cold = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=2, kernels="torch")
    want = cold.generate(PROMPTS[:2], max_new_tokens=16, window=4, init_weights="learned")
    warm = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=2, kernels="torch", warmup=True)
    try:
        assert warm.engine.stats["rounds"] == 0 and warm.weights.requests == 0
        assert all(r.tokens_fed == 0 for r in warm.runners.values())
        assert warm.cache.free_slots == 2
        assert warm.weights.learned == warm.weights.uniform()
        got = warm.generate(PROMPTS[:2], max_new_tokens=16, window=4, init_weights="learned")
        assert [r.text for r in got] == [r.text for r in want]
        assert warm.weights.learned == cold.weights.learned
        assert warm.warmup() > 0 and warm.weights.requests == cold.weights.requests
    finally:
        cold.close()
        warm.close()
