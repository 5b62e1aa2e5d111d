"""One spec per Open X-Embodiment dataset: its published feature layout (the per-step keys of its features.json
with their shapes) and how its action becomes the common 7-D end-effector action (xyz delta, rpy delta,
gripper in [0, 1] with 1 = open), following OpenVLA's and Octo's standardisation of the same dataset (which, like
them, passes an absolute pose or an axis-angle rotation on where that is what a dataset stores).

Keys are the flattened per-step feature names without the `steps/` prefix (`observation/image`, `action`, ...).
The named mixtures are OpenVLA's, with its sampling weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# gripper rules: how the dataset's gripper value becomes 1 = open / 0 = closed
GRIPPER_RULES = (
    "rel2abs",  # relative command (+1 close, -1 open, ~0 keep) -> absolute state
    "binarize",  # continuous openness -> 0/1, in-between values take the next decided state
    "clip",  # -1 close / +1 open -> clip to [0, 1]
    "invert_clip",  # +1 close / -1 (or 0) open -> 1 - clip(x, 0, 1)
    "invert",  # 1 close / 0 open -> 1 - x
    "as_is",  # already 1 open / 0 closed
)


@dataclass(frozen=True)
class Feature:
    """A per-step feature of the published layout: key, kind (image, float, int, int64, bool, text) and per-step
    shape."""

    key: str
    kind: str
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Slice:
    """`count` consecutive values of a per-step vector feature, from `start`."""

    key: str
    start: int = 0
    count: int = 3


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset's episodes are read and standardised.

    `images` maps a camera role (primary, wrist) to its observation key. `xyz` / `rot` say where the translation
    and rotation deltas sit (rot None: zeros; `rot_quaternion`: an xyzw quaternion converted to roll-pitch-yaw).
    The gripper is read from `gripper` (a one-value Slice) and converted by `gripper_rule`, or is the constant
    `gripper_constant`. `language` is the instruction key; `language_codepoints` marks a fixed-length int array
    of unicode code points padded with zeros (language_table). `relabel_from_state` (bridge) takes the xyz/rpy
    deltas as state[t+1] - state[t] over the first six state values and drops the last step; `drop_first` drops
    step 0 (bridge's first action is all zeros). `absolute_pose` marks a dataset whose stored arm action is a
    target end-effector pose rather than a delta; OpenVLA trains on it as is (normalised per dataset with its own
    q01 / q99, not differenced), and so do this reader and the mixture data module."""

    name: str
    features: tuple[Feature, ...]
    images: dict[str, str]
    xyz: Slice
    language: str
    rot: Slice | None = None
    rot_quaternion: bool = False
    gripper: Slice | None = None
    gripper_rule: str = "as_is"
    gripper_constant: float | None = None
    language_codepoints: bool = False
    state: str | None = None
    state_encoding: str = "none"  # pos_euler | pos_quat | joint | none, as OpenVLA labels the proprio
    drop_first: bool = False
    relabel_from_state: bool = False
    absolute_pose: bool = False
    tfds_name: str | None = None  # dataset_info.json's name when it differs from the folder's
    feature_shapes: dict[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.gripper_rule not in GRIPPER_RULES:
            raise ValueError(f"{self.name}: gripper rule {self.gripper_rule!r} is not one of {GRIPPER_RULES}")
        if (self.gripper is None) == (self.gripper_constant is None):
            raise ValueError(f"{self.name}: give exactly one of gripper and gripper_constant")
        object.__setattr__(self, "feature_shapes", {f.key: f.shape for f in self.features})
        for key in self.required_keys():
            if key not in self.feature_shapes:
                raise ValueError(f"{self.name}: {key} is read but not among the spec's features")

    def required_keys(self) -> list[str]:
        """The per-step keys the standardisation reads: every one must be in the dataset's features.json."""
        keys = [self.images["primary"], self.xyz.key, self.language]
        keys += [s.key for s in (self.rot, self.gripper) if s is not None]
        if self.relabel_from_state:
            keys.append(self.state)
        return list(dict.fromkeys(keys))


def _img(key: str, h: int, w: int) -> Feature:
    return Feature(key, "image", (h, w, 3))


def _vec(key: str, *shape: int) -> Feature:
    return Feature(key, "float", tuple(shape))


_NL = Feature("observation/natural_language_instruction", "text")
_LI = Feature("language_instruction", "text")
_WV, _RD = _vec("action/world_vector", 3), _vec("action/rotation_delta", 3)


def _rtx(name: str, images: dict[str, Feature], gripper: Feature | None, rule: str = "as_is", *,
         rotation: bool = True, constant: float | None = None, extra: tuple[Feature, ...] = (),
         state_encoding: str = "none") -> DatasetSpec:
    """The RT-X layout: action/world_vector, action/rotation_delta, a gripper action and a per-step
    observation/natural_language_instruction."""
    feats = (*images.values(), _WV, *((_RD,) if rotation else ()), *((gripper,) if gripper else ()), _NL, *extra)
    return DatasetSpec(
        name, feats, {role: f.key for role, f in images.items()}, Slice(_WV.key), _NL.key,
        rot=Slice(_RD.key) if rotation else None, gripper=Slice(gripper.key, 0, 1) if gripper else None,
        gripper_rule=rule, gripper_constant=constant, state_encoding=state_encoding)


def _flat(name: str, images: dict[str, Feature], action_dim: int, state_dim: int, *, rule: str, xyz: int = 0,
          rot: int | None = 3, grip: int | None = 6, quaternion: bool = False, gripper_from_state: int | None = None,
          state_encoding: str = "none", absolute_pose: bool = False) -> DatasetSpec:
    """The `_converted_externally_to_rlds` layout: one flat `action` vector, `observation/state` and a
    step-level `language_instruction`."""
    action, state = _vec("action", action_dim), _vec("observation/state", state_dim)
    if gripper_from_state is not None:
        gripper = Slice(state.key, gripper_from_state, 1)
    else:
        gripper = Slice(action.key, grip, 1)
    return DatasetSpec(
        name, (*images.values(), action, state, _LI), {role: f.key for role, f in images.items()},
        Slice(action.key, xyz), _LI.key, rot=None if rot is None else Slice(action.key, rot, 4 if quaternion else 3),
        rot_quaternion=quaternion, gripper=gripper, gripper_rule=rule, state=state.key, state_encoding=state_encoding,
        absolute_pose=absolute_pose)


def _cams(primary: Feature, wrist: Feature | None = None) -> dict[str, Feature]:
    return {"primary": primary} | ({"wrist": wrist} if wrist is not None else {})


_SPECS = [
    _rtx("fractal20220817_data", _cams(_img("observation/image", 256, 320)),
         _vec("action/gripper_closedness_action", 1), "rel2abs", state_encoding="pos_quat",
         extra=(_vec("observation/base_pose_tool_reached", 7), _vec("observation/gripper_closed", 1))),
    _rtx("kuka", _cams(_img("observation/image", 512, 640)), _vec("action/gripper_closedness_action", 1), "rel2abs",
         state_encoding="pos_quat"),
    DatasetSpec(
        "bridge_orig", (_img("observation/image_0", 256, 256), _img("observation/image_1", 256, 256),
                        _vec("observation/state", 7), _vec("action", 7), _LI),
        {"primary": "observation/image_0"}, Slice("action", 0), _LI.key, rot=Slice("action", 3),
        gripper=Slice("action", 6, 1), gripper_rule="binarize", state="observation/state",
        state_encoding="pos_euler", drop_first=True, relabel_from_state=True, tfds_name="bridge_dataset"),
    DatasetSpec(
        "taco_play", (_img("observation/rgb_static", 150, 200), _img("observation/rgb_gripper", 84, 84),
                      _vec("observation/robot_obs", 15), _vec("action/rel_actions_world", 7), _NL),
        {"primary": "observation/rgb_static", "wrist": "observation/rgb_gripper"},
        Slice("action/rel_actions_world", 0), _NL.key, rot=Slice("action/rel_actions_world", 3),
        gripper=Slice("action/rel_actions_world", 6, 1), gripper_rule="clip", state="observation/robot_obs",
        state_encoding="pos_euler"),
    _rtx("jaco_play", _cams(_img("observation/image", 224, 224), _img("observation/image_wrist", 224, 224)),
         _vec("action/gripper_closedness_action", 1), "rel2abs", rotation=False, state_encoding="pos_euler",
         extra=(_vec("observation/end_effector_cartesian_pos", 7),)),
    _rtx("berkeley_cable_routing", _cams(_img("observation/image", 128, 128),
                                         _img("observation/wrist45_image", 128, 128)),
         None, constant=0.0, state_encoding="joint", extra=(_vec("observation/robot_state", 7),)),
    _rtx("roboturk", _cams(_img("observation/front_rgb", 480, 640)), _vec("action/gripper_closedness_action", 1),
         "invert_clip"),
    _rtx("viola", _cams(_img("observation/agentview_rgb", 224, 224), _img("observation/eye_in_hand_rgb", 224, 224)),
         _vec("action/gripper_closedness_action"), "invert_clip", state_encoding="joint"),
    _rtx("berkeley_autolab_ur5", _cams(_img("observation/image", 480, 640), _img("observation/hand_image", 480, 640)),
         _vec("action/gripper_closedness_action"), "rel2abs", state_encoding="pos_quat",
         extra=(_vec("observation/robot_state", 15),)),
    _rtx("toto", _cams(_img("observation/image", 480, 640)), Feature("action/open_gripper", "bool"), "as_is",
         state_encoding="joint", extra=(_vec("observation/state", 7),)),
    DatasetSpec(
        "language_table", (_img("observation/rgb", 360, 640), _vec("action", 2),
                           Feature("observation/instruction", "int", (512,)),
                           _vec("observation/effector_translation", 2)),
        {"primary": "observation/rgb"}, Slice("action", 0, 2), "observation/instruction", gripper_constant=1.0,
        language_codepoints=True, state="observation/effector_translation", state_encoding="pos_euler"),
    _flat("stanford_hydra_dataset_converted_externally_to_rlds",
          _cams(_img("observation/image", 240, 320), _img("observation/wrist_image", 240, 320)), 7, 27,
          rule="invert", state_encoding="pos_euler"),
    _flat("austin_buds_dataset_converted_externally_to_rlds",
          _cams(_img("observation/image", 128, 128), _img("observation/wrist_image", 128, 128)), 7, 24,
          rule="invert_clip", state_encoding="joint"),
    _flat("nyu_franka_play_dataset_converted_externally_to_rlds", _cams(_img("observation/image", 128, 128)), 15, 13,
          rule="clip", xyz=7, rot=10, grip=13, state_encoding="pos_euler"),
    _flat("furniture_bench_dataset_converted_externally_to_rlds",
          _cams(_img("observation/image", 224, 224), _img("observation/wrist_image", 224, 224)), 8, 35,
          rule="invert_clip", quaternion=True, grip=7, state_encoding="pos_quat"),
    _flat("ucsd_kitchen_dataset_converted_externally_to_rlds", _cams(_img("observation/image", 480, 640)), 8, 21,
          rule="as_is", state_encoding="joint", absolute_pose=True),
    _flat("austin_sailor_dataset_converted_externally_to_rlds",
          _cams(_img("observation/image", 128, 128), _img("observation/wrist_image", 128, 128)), 7, 8,
          rule="invert_clip", state_encoding="pos_quat"),
    _flat("austin_sirius_dataset_converted_externally_to_rlds",
          _cams(_img("observation/image", 84, 84), _img("observation/wrist_image", 84, 84)), 7, 8,
          rule="invert_clip", state_encoding="pos_quat"),
    # its rotation slots hold yaw/pitch/roll (scipy "zxy"), which OpenVLA passes on unchanged as well
    _flat("dlr_edan_shared_control_converted_externally_to_rlds", _cams(_img("observation/image", 360, 640)), 7, 7,
          rule="invert", state_encoding="pos_euler", absolute_pose=True),
    _flat("iamlab_cmu_pickup_insert_converted_externally_to_rlds",
          _cams(_img("observation/image", 360, 640), _img("observation/wrist_image", 240, 320)), 8, 20,
          rule="as_is", quaternion=True, grip=7, state_encoding="joint", absolute_pose=True),
    _flat("utaustin_mutex", _cams(_img("observation/image", 128, 128), _img("observation/wrist_image", 128, 128)),
          7, 24, rule="invert_clip", state_encoding="joint"),
    # stores no gripper action: state[6] (TFDS: "gripper open status") inverted stands in, as OpenVLA does
    _flat("berkeley_fanuc_manipulation",
          _cams(_img("observation/image", 224, 224), _img("observation/wrist_image", 224, 224)), 6, 13,
          rule="invert", gripper_from_state=6, state_encoding="joint"),
    _flat("cmu_stretch", _cams(_img("observation/image", 128, 128)), 8, 4, rule="as_is", state_encoding="pos_euler"),
    # oxe_magic_soup_plus: the first of the next 10 future steps; the rotation is an axis-angle delta, which OpenVLA
    # passes on in the roll-pitch-yaw slots; target_close is absolute (1 closed) and inverted
    DatasetSpec(
        "bc_z", (_img("observation/image", 171, 213), _vec("action/future/xyz_residual", 30),
                 _vec("action/future/axis_angle_residual", 30), Feature("action/future/target_close", "int64", (10,)),
                 _NL, _vec("observation/present/xyz", 3), _vec("observation/present/axis_angle", 3),
                 _vec("observation/present/sensed_close", 1)),
        {"primary": "observation/image"}, Slice("action/future/xyz_residual", 0), _NL.key,
        rot=Slice("action/future/axis_angle_residual", 0), gripper=Slice("action/future/target_close", 0, 1),
        gripper_rule="invert", state_encoding="pos_euler"),
    # TFDS names it fmb; OpenVLA's mixtures call the folder fmb_dataset. Its 7-D action is taken as stored.
    DatasetSpec(
        "fmb_dataset", (_img("observation/image_side_1", 256, 256), _img("observation/image_side_2", 256, 256),
                        _img("observation/image_wrist_1", 256, 256), _vec("action", 7), _vec("observation/eef_pose", 7),
                        _vec("observation/state_gripper_pose"), _LI),
        {"primary": "observation/image_side_1", "wrist": "observation/image_wrist_1"}, Slice("action", 0), _LI.key,
        rot=Slice("action", 3), gripper=Slice("action", 6, 1), state_encoding="pos_euler", tfds_name="fmb"),
    # a hand-held gripper camera is its only (and primary) view, as in OpenVLA
    _flat("dobbe", _cams(_img("observation/wrist_image", 256, 256)), 7, 7, rule="as_is", state_encoding="pos_euler"),
]
SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
# the Bridge V2 release from the project site is also downloaded under its TFDS name
SPECS["bridge_dataset"] = SPECS["bridge_orig"]
SPECS["fmb"] = SPECS["fmb_dataset"]

_MAGIC_SOUP = [
    ("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
    ("jaco_play", 1.0), ("berkeley_cable_routing", 1.0), ("roboturk", 2.0), ("viola", 2.0),
    ("berkeley_autolab_ur5", 2.0), ("toto", 1.0), ("language_table", 0.1),
    ("stanford_hydra_dataset_converted_externally_to_rlds", 2.0),
    ("austin_buds_dataset_converted_externally_to_rlds", 1.0),
    ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
    ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
    ("ucsd_kitchen_dataset_converted_externally_to_rlds", 2.0),
    ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
    ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
    ("dlr_edan_shared_control_converted_externally_to_rlds", 1.0),
    ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0), ("utaustin_mutex", 1.0),
    ("berkeley_fanuc_manipulation", 2.0), ("cmu_stretch", 1.0),
]
# Named mixtures: (dataset, sampling weight), OpenVLA's (RoboVLMs trains on the same ones). The magic soup
# leaves out OpenVLA's disabled entries (nyu_door_opening: wrist camera only; bc_z and uiuc_d3field: broken data).
MIXTURES: dict[str, list[tuple[str, float]]] = {
    "bridge": [("bridge_orig", 1.0)],
    "fractal": [("fractal20220817_data", 1.0)],
    "rt_1": [("fractal20220817_data", 1.0)],  # RoboVLMs' name for the RT-1 data alone
    "bridge_rt_1": [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)],
    "rtx": [
        ("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
        ("jaco_play", 2.0), ("berkeley_cable_routing", 3.0), ("roboturk", 1.0), ("viola", 2.0),
        ("berkeley_autolab_ur5", 1.0), ("toto", 1.0),
    ],
    "oxe_magic_soup": _MAGIC_SOUP,
    # the magic soup plus bc_z, fmb and dobbe, without language_table, fractal at weight 1 (OpenVLA's; its
    # oxe_magic_soup_plus adds DROID, which has no standardisation here)
    "oxe_magic_soup_plus_minus": [
        ("fractal20220817_data", 1.0), *(entry for entry in _MAGIC_SOUP[1:] if entry[0] != "language_table"),
        ("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2),
    ],
}


def resolve_mixture(mixture: str | list, where: str = "") -> list[tuple[str, float]]:
    """A mixture name or an explicit [(dataset, weight), ...] list -> entries, every dataset checked to have a
    standardisation (ValueError naming the ones that do not, and `where` the mixture is read from)."""
    if isinstance(mixture, str):
        if mixture not in MIXTURES:
            raise ValueError(f"unknown mixture {mixture!r}; valid: {sorted(MIXTURES)}")
        entries = MIXTURES[mixture]
    else:
        entries = []
        for entry in mixture:
            name, weight = (entry, 1.0) if isinstance(entry, str) else tuple(entry)
            entries.append((str(name), float(weight)))
    unknown = [name for name, _ in entries if name not in SPECS]
    if unknown:
        raise ValueError(f"mixture datasets {unknown}{' (' + where + ')' if where else ''} have no standardisation; "
                         f"known datasets: {sorted(SPECS)}")
    bad = [(name, w) for name, w in entries if not w > 0]
    if bad or not entries:
        raise ValueError(f"mixture weights must be positive and the mixture non-empty; got {bad or entries}")
    return entries
