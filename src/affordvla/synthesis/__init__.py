"""KALIE's affordance-aware data synthesis: contracts in `interfaces`, the geometry of one
object's move in `geometry`, one variant in `recipe`, the whole dataset stage in `pipeline`, its Hydra app in
`cli`; backends: `compositing` (offline, no weights) and the diffusion one in `inpaint`."""
