def test_tiny_model_loads_with_mlx_lm(tiny_model_dir):
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    ids = tokenizer.encode("Hello world")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), 49152)
    assert mx.all(mx.isfinite(logits)).item()
