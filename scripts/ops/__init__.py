"""Operations: upload weights, warm a cache, build/push and smoke-test the RunPod image."""
