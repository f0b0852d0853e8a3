"""Parity figures from greedy answers (hf2mlflow/parity.py `summarize`): a prompt counts as identical only when
the served engine gives the reference's tokens alone and as a row of a batch."""

from hf2mlflow.parity import PromptParity, summarize

REF = [5, 6, 7]


def test_a_batched_answer_that_differs_makes_the_prompt_not_identical():
    results = [PromptParity(REF, REF, tokenizer_agrees=True, batch_tokens=REF, genai_tokens=REF),
               PromptParity(REF, REF, tokenizer_agrees=True, batch_tokens=[5, 6, 8], genai_tokens=[5, 9])]
    summary = summarize(results)
    assert summary["parity_identical_rate_alone"] == 1.0
    assert summary["parity_identical_rate"] == summary["parity_identical_rate_batched"] == 0.5
    assert summary["batch_equals_alone_rate"] == 0.5 and summary["genai_agreement_rate"] == 0.5


def test_an_engine_that_does_not_batch_is_judged_alone_and_logs_no_batch_figures():
    summary = summarize([PromptParity(REF, REF, tokenizer_agrees=True), PromptParity(REF, [5], tokenizer_agrees=False)])
    assert summary["parity_identical_rate"] == 0.5 and summary["tokenizer_agreement_rate"] == 0.5
    assert "parity_identical_rate_batched" not in summary and "genai_agreement_rate" not in summary
