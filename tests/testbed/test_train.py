"""The training script: targets agree with the scene, and a few steps of every stage run and save."""

import math

import torch

from vispruner.testbed.model import NUM_PATCHES, PATCH_SIZE, load_testbed
from vispruner.testbed.scenes import Scene, Shape
from vispruner.testbed.train import PAIRS, main, tower_targets

GRID = math.isqrt(NUM_PATCHES)


def test_tower_targets_name_each_object_where_it_lies():
    big = Shape("red", "square", x=3.5 * PATCH_SIZE, y=2.5 * PATCH_SIZE, size=28)  # covers patch (2, 3) whole
    small = Shape("blue", "circle", x=7 * PATCH_SIZE - 7, y=7 * PATCH_SIZE + 7, size=10)  # inside patch (7, 6)
    targets = tower_targets([Scene((big, small), (90, 90, 90), seed=0)])
    patch = targets["patch"][0].view(GRID, GRID)
    assert patch[2, 3] == PAIRS.index(("red", "square")) + 1
    assert patch[7, 6] == PAIRS.index(("blue", "circle")) + 1
    # The 28 px square spans 2 x 2 patches at least partly and 3 x 3 at most; nothing else is labelled.
    assert 4 <= int((patch == PAIRS.index(("red", "square")) + 1).sum()) <= 9
    assert int((patch > 0).sum()) <= 9 + 1
    assert targets["count"].tolist() == [2]
    assert targets["presence"][0].nonzero().flatten().tolist() == sorted(
        [PAIRS.index(("red", "square")), PAIRS.index(("blue", "circle"))]
    )


def test_a_few_steps_of_every_stage_train_and_save_a_loadable_model(tmp_path, capsys):
    torch.manual_seed(0)
    main(
        [
            "--out", str(tmp_path), "--tower-steps", "2", "--align-steps", "1", "--language-steps", "2",
            "--batch", "4", "--language-batch", "4", "--train-scenes", "8", "--val-size", "8",
        ]
    )
    log = capsys.readouterr().out
    for stage in ("tower", "align", "tune", "answer prior", "training took"):
        assert stage in log
    model, processor = load_testbed(tmp_path)
    assert model.config.image_seq_length == NUM_PATCHES
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index


def test_grounding_marks_the_patches_of_the_objects_asked_about():
    from vispruner.testbed.scenes import Question
    from vispruner.testbed.train import grounding_targets

    labels = torch.zeros(2, NUM_PATCHES, dtype=torch.long)
    red_square = PAIRS.index(("red", "square")) + 1
    labels[0, [3, 4, 11]] = red_square
    labels[0, 20] = PAIRS.index(("blue", "circle")) + 1
    labels[1, 5] = red_square
    about = Question("is there a red square ?", "yes", "presence", (("red", "square"),))
    absent = Question("is there a red circle ?", "no", "presence", ())
    targets = grounding_targets(labels, [about, absent])
    assert targets[0].nonzero().flatten().tolist() == [3, 4, 11]
    assert not targets[1].any()


def test_curriculum_keeps_objects_and_grows_to_everything():
    import random

    from vispruner.testbed.train import curriculum_keep

    labels = torch.zeros(3, NUM_PATCHES, dtype=torch.long)
    labels[:, [0, 9, 63]] = 1
    short = curriculum_keep(labels, 0.0, random.Random(0))
    assert short[:, [0, 9, 63]].all()
    assert ((short.sum(-1) >= 3 + 4) & (short.sum(-1) <= 3 + 12)).all()
    assert curriculum_keep(labels, 1.0, random.Random(0)).all()
