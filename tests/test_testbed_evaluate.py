"""The model-card breakdown of POPE false "yes" answers into absent partners and other absent classes."""

from lvlm_steer.evals.pope.data import PopeQuestion
from lvlm_steer.testbed.evaluate import partner_false_yes


def _q(image: str, name: str, label: str) -> PopeQuestion:
    return PopeQuestion(question_id=name, image=image, text=f"Is there a {name} in the image?", label=label)


def test_false_yes_split_by_absent_partner():
    present = {"a.png": {"fork", "cup"}}
    questions = [_q("a.png", "fork", "yes"), _q("a.png", "knife", "no"), _q("a.png", "spoon", "no"),
                 _q("a.png", "vase", "no"), _q("a.png", "pizza", "no")]  # fmt: skip
    preds = ["yes", "yes", "no", "yes", "no"]
    out = partner_false_yes(questions, preds, present)
    # knife (fork's partner) and spoon (cup's) are absent partners; vase and pizza are not
    assert out["partner_negatives"] == 2 and out["partner_false_yes"] == 0.5
    assert out["other_negatives"] == 2 and out["other_false_yes"] == 0.5
    preds[1] = "no"
    assert partner_false_yes(questions, preds, present)["partner_false_yes"] == 0.0
