"""What the `fastdca` command runs (fastdca/cli.py parses the command line and calls these): `eval`,
`inspect` (attention_maps), `demo`, `sweep`, `check`, and the model loading they share (models).

Nothing is imported here, so that `fastdca --help` and each command import only what they use.
"""
