"""KALIE's five tasks: instructions, object prompts and the fine-tuning prompt text."""

from __future__ import annotations

from dataclasses import dataclass

from affordvla.formats.sample import KALIE_POINT_NAMES


@dataclass(frozen=True)
class KalieTask:
    """One of KALIE's tasks: its instruction, the objects it involves and what each keypoint means."""

    name: str
    instruction: str
    objects: tuple[str, ...]  # GroundingDINO prompts / object names, in synthesis order
    point_definitions: tuple[str, ...]  # one bullet per keypoint, KALIE_POINT_NAMES order


TASKS: dict[str, KalieTask] = {
    task.name: task
    for task in (
        KalieTask(
            "trash_sweeping",
            "Sweep the trash off the table with the brush.",
            ("brush", "trash"),
            (
                "Grasp Point: where the gripper holds the brush, on its handle.",
                "Function Point: the point of the brush bristles that touches the trash.",
                "Target Point: the trash to be swept.",
                "Pre-contact Point: a waypoint in free space before the brush reaches the trash.",
                "Post-contact Point: a waypoint in free space after the sweep, off the table side.",
            ),
        ),
        KalieTask(
            "drawer_closing",
            "Close the drawer.",
            ("open drawer",),
            (
                "Grasp Point: the point of the drawer front the gripper pushes.",
                "Function Point: the same as the Grasp Point.",
                "Target Point: the same as the Grasp Point.",
                "Pre-contact Point: a waypoint in front of the open drawer before contact.",
                "Post-contact Point: where the pushed point ends when the drawer is closed.",
            ),
        ),
        KalieTask(
            "towel_hanging",
            "Hang the cloth on the rack.",
            ("cloth", "rack"),
            (
                "Grasp Point: where the gripper holds the cloth.",
                "Function Point: the same as the Grasp Point.",
                "Target Point: the point of the rack bar the cloth is hung on.",
                "Pre-contact Point: a waypoint above the near side of the rack.",
                "Post-contact Point: a waypoint past the far side of the rack.",
            ),
        ),
        KalieTask(
            "pouring",
            "Pour the small items out of the scooper and into the bowl",
            ("scooper with small items in it", "bowl"),
            (
                "Grasp Point: where the gripper holds the scoop handle.",
                "Function Point: the point of the scoop that moves over the target.",
                "Target Point: the centre of the bowl.",
                "Pre-contact Point: the same as the Target Point.",
                "Post-contact Point: the same as the Target Point.",
            ),
        ),
        KalieTask(
            "unplugging",
            "Unplug the usb stick from the computer",
            ("usb stick", "computer"),
            (
                "Grasp Point: where the gripper holds the usb stick.",
                "Function Point: the same as the Grasp Point.",
                "Target Point: a free-space point the stick is pulled to.",
                "Pre-contact Point: a waypoint on the line from the stick to the Target Point.",
                "Post-contact Point: a waypoint on the same line past the Target Point.",
            ),
        ),
    )
}

KALIE_PROMPT_HEAD = (
    "Describe the robot gripper's motion to {task}. This should be done by outputting a string of keypoints and "
    "waypoints based on the provided image of the current table-top environment captured from a top-down camera."
)


def kalie_prompt(task: KalieTask) -> str:
    """The long KALIE fine-tuning prompt for one task (KALIE's structure, our own wording of the bullets)."""
    instruction = task.instruction.rstrip(".")
    example = "{\n" + ",\n".join(f'    "{name}": [x, y]' for name in KALIE_POINT_NAMES) + "\n}"
    return (
        KALIE_PROMPT_HEAD.format(task=instruction[0].lower() + instruction[1:])
        + " The definition of these keypoints and waypoints are:\n"
        + "\n".join(f"- {line}" for line in task.point_definitions)
        + "\nPlease structure your response in the following format, where x and y are pixel coordinates:\n"
        + example
    )


def task_for_instruction(instruction: str) -> KalieTask | None:
    for task in TASKS.values():
        if task.instruction.rstrip(".").lower() == instruction.rstrip(".").lower():
            return task
    return None
