"""Offline stand-ins: what the project runs on where no model hub or dataset download is reachable.

Each stand-in replaces one download and is read by the same code as the real thing: the procedural scene and
episode generators write KALIE's, RoboPoint's, CALVIN's, RLBench's and Open X-Embodiment's on-disk formats
(`toy_*`, `tabletop`); the tiny-model writers save random-weight checkpoints in the layouts of PaliGemma, LLaVA,
CogVLM and of the synthesis stage's models (`tiny_*`, `tokenizer_corpus`), and `synthesis_timing` builds
random-weight SD1.5-size models to time the diffusion backend; `toy_env` simulates the toy action world for
closed-loop rollouts.

Nothing in the product's core imports this package: configs name a stand-in by `_target_` (`dataset.generate`,
`backbone.build`, `synthesis.tiny_models`), and the data modules, backbone loaders and synthesis stage call what
they are given. This package may import any layer below it.
"""
