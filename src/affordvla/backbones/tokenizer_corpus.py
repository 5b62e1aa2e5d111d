"""Text the offline tiny tokenizers are trained on: every prompt the project writes, plus common English."""

from __future__ import annotations

from affordvla.data.kalie_tasks import TASKS, kalie_prompt

_COMMON = (
    "the a an of to and in on with from for is are be this that it its at by as or not what where which "
    "robot gripper image table top down camera view object point points keypoint keypoints waypoint waypoints "
    "grasp function target pre contact post move pick place push pull open close left right up down next step "
    "action actions answer question describe output format pixel coordinates each one two three four five "
    "red green blue yellow black white small large bowl cup brush trash drawer towel cloth rack scooper usb "
    "stick computer laptop items please structure your response following where x y"
)


def tokenizer_corpus() -> list[str]:
    lines = [_COMMON]
    for task in TASKS.values():
        lines += [task.instruction, kalie_prompt(task), " ".join(task.objects)]
    lines += [str(i) for i in range(1000)]
    return lines
