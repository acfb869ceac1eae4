import pytest

from asr.text import BLANK_ID, SPACE_ID, VOCAB, Tokenizer, normalize


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, world!", "HELLO WORLD"),
        ("It was 1878, they said.", "IT WAS EIGHTEEN SEVENTY EIGHT THEY SAID"),
        ("Journal 243", "JOURNAL TWO HUNDRED AND FORTY THREE"),
        ("the 21st of May", "THE TWENTY FIRST OF MAY"),
        ("Mr. and Mrs. Smith met Dr. Watson", "MISTER AND MISSUS SMITH MET DOCTOR WATSON"),
        ("it costs $5", "IT COSTS FIVE DOLLARS"),
        ("3.5% of 1,000", "THREE POINT FIVE PERCENT OF ONE THOUSAND"),
        ("Don\u2019t 'quote' me", "DON'T QUOTE ME"),
        ("caf\u00e9 na\u00efve -- rock & roll", "CAFE NAIVE ROCK AND ROLL"),
        ("  spaced\tout\n", "SPACED OUT"),
        ("well-known", "WELL KNOWN"),
        ("", ""),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


def test_normalize_is_idempotent_and_in_vocabulary() -> None:
    text = normalize("On 16 July, 1897 -- O'Brien's \"journal\" (p. 12) said: 50% & more!")
    assert normalize(text) == text
    Tokenizer().encode(text)  # raises if any character is outside the vocabulary


def test_vocabulary_layout() -> None:
    assert VOCAB[BLANK_ID] == "<blank>" and VOCAB[SPACE_ID] == " " and VOCAB[2] == "'"
    assert "".join(VOCAB[3:]) == "ABCDEFGHIJKLMNOPQRSTUVWXYZ" and len(VOCAB) == 29


def test_tokenizer_round_trip_and_errors() -> None:
    tok = Tokenizer()
    ids = tok.encode("IT'S A TEST")
    assert tok.decode(ids) == "IT'S A TEST" and BLANK_ID not in ids
    assert tok.decode([BLANK_ID, *ids, BLANK_ID]) == "IT'S A TEST"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("lower case")
    with pytest.raises(ValueError, match="must start with"):
        Tokenizer(("A", "B"))
