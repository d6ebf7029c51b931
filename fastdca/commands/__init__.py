"""What the `fastdca` command runs: fastdca/cli.py parses the command line and calls these modules.

    models          model loading: a local Hugging Face folder or .gguf file, and the embedded SmolLM2-135M
    eval            `fastdca eval`: accuracy from batched greedy generation; Var(X_G) across prompts
    attention_maps  `fastdca inspect`: the adapter attention of each token (the paper's Fig. 3), X_G apart
    demo            `fastdca demo`: SmolLM2-135M on Letter Concatenation, before and after DCA
    sweep           `fastdca sweep`: a grid over DCAConfig fields and seeds, trained and evaluated
    check           `fastdca check`: versions, numerics against the reference, GPU speed

Nothing is imported here, so that `fastdca --help` and each command import only what they use.
"""
