"""The tokenizer of the official CHAIR code (``nltk.word_tokenize``: Punkt sentences, then the NLTK/Treebank word
rules), re-implemented for ``--chair-rules official`` without nltk or its downloaded data.

Only what can change a CHAIR mention is reproduced. A token can be an object form only if it is all letters, so what
matters is which letter runs end up as tokens of their own and which tokens are neighbours (a two-word phrase needs
two neighbouring tokens). As in nltk 3.10 (the version it was checked against), these become tokens of their own:

* ``"``, ``''``, curly quotes, backquotes, ``; @ # $ % &``, ``? !``, ``*``, brackets ``( ) [ ] { } < >``, the dashes
  U+2012-U+2015, ``--`` and runs of two or more periods ("cat...dog" is three tokens);
* ``,`` and ``:`` unless a digit follows ("1,000" and "3:30" stay whole; so does "dog,5");
* the period that ends a sentence. Punkt may end one at ".", "?" or "!" before whitespace or one of
  ``) " ; } ] * : @ ' ( { [ ! ?``, curly quotes and guillemets; of several such marks with no whitespace between
  them only the last ends the sentence ("dog.! the" keeps "dog." whole), and closing marks that follow, up to a
  space, join that sentence, so its period is split off only if the word rules allow each of them after it
  ('dog."“ x' keeps "dog."). A period before a letter, digit, ``,``, ``%``, ``-`` or ``/`` stays on its word
  ("sofa.the" is one token). No CHAIR form is one of Punkt's English abbreviations, so its abbreviation list never
  decides a mention and is not needed;
* apostrophes: an opening quote before a word ("'dog'" -> ``'``, ``dog``, ``'``), and the endings ``'s 'm 'd 'll
  're 've n't`` and a bare ``'`` at the end of a word ("dog's" -> ``dog``, ``'s``; "dogs'" -> ``dogs``, ``'``).

Everything else stays inside its token: hyphens ("man-made", "vase-like"), slashes ("cat/dog"), underscores,
digits ("2dogs"), ``+ = ~ ^ |`` and a single period inside a word. Not reproduced, because they never touch a form:
nltk's contraction splits ("cannot" -> "can", "not") and the ```` `` ```` / ``''`` renaming of double quotes.
"""

from __future__ import annotations

import re

# NLTK's word rules that can move a token boundary next to a letter, in NLTK's order (the order matters where
# rules look at spaces that earlier rules insert, e.g. "dog's'(" keeps "dog's" whole)
_APART = r" \g<0> "
_BEFORE_PADDING = [
    (re.compile(r'^"'), "``"),
    (re.compile(r"``|[«“‘„]|`+"), _APART),
    (re.compile(r"""([ (\[{<])("|'')"""), r"\1 `` "),
    (re.compile(r"(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), "' "),  # an opening single quote
    (re.compile(r"""(?<=[^.])\.(?=[\])}>"'»”’ ]*\s*$)"""), " . "),  # the sentence's last period
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),  # consumes the next character, as NLTK does: ",," splits once
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}|[;@#$%&]|[\u2012-\u2015]|[?!]"), _APART),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*\[\](){}<>]|--"), _APART),
]
_AFTER_PADDING = [
    (re.compile(r"[»”’]|''"), _APART),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
# where Punkt may end a sentence: ".", "?" or "!" before one of these characters or before whitespace and more text
_SENTENCE_END = re.compile(r"""[.?!](?=[)";}\]*:@'({\[‘’“”«»!?]|\s+\S)""")
# closing marks that Punkt moves from the start of a sentence to the end of the one before
_REALIGN = re.compile(r"""["')\]}‘’“”«»]+?(?:\s+|(?=--)|$)""", re.MULTILINE)


def _sentences(text: str) -> list[str]:
    """Punkt's sentences, as far as they matter here. A sentence ends at a possible end that no other possible end
    follows within the same whitespace-free stretch (Punkt folds "dog.!" or "dog.)." into one end at the last
    mark, so the period stays on "dog"); closing marks at the start of the next sentence, up to whitespace, move
    to its end ('dog."“ x' ends with '"“', so that period stays on "dog" too). Ends after abbreviations are kept
    as well: no CHAIR form is a Punkt abbreviation.
    """
    ends = [m for m in _SENTENCE_END.finditer(text)]
    kept = [m for m, after in zip(ends, ends[1:], strict=False) if re.search(r"\s", text[m.end() : after.start()])]
    kept += ends[-1:]
    slices, start = [], 0
    for m in kept:
        slices.append((start, m.end()))
        start = m.end() + len(text[m.end() :]) - len(text[m.end() :].lstrip()) if text[m.end()].isspace() else m.end()
    slices.append((start, len(text.rstrip())))
    sentences, shift = [], 0
    for (first, stop), (second, second_stop) in zip(slices, [*slices[1:], (0, 0)], strict=True):
        first += shift
        shift = 0
        moved = _REALIGN.match(text[second:second_stop]) if second_stop > second else None
        if moved:
            stop, shift = second + len(moved.group(0).rstrip()), moved.end()
        sentences.append(text[first:stop])
    return sentences


def _word_tokens(sentence: str) -> list[str]:
    """The NLTK word rules that can change a CHAIR mention, on one sentence."""
    for pattern, replacement in _BEFORE_PADDING:
        sentence = pattern.sub(replacement, sentence)
    sentence = f" {sentence} "
    for pattern, replacement in _AFTER_PADDING:
        sentence = pattern.sub(replacement, sentence)
    return sentence.split()


def official_tokens(caption: str) -> list[str]:
    """The tokens ``nltk.word_tokenize`` gives for ``caption``, as far as CHAIR mentions can tell them apart."""
    return [token for sentence in _sentences(caption) for token in _word_tokens(sentence)]
