"""The tokenizer of the official CHAIR code (``nltk.word_tokenize``: Punkt sentences, then the NLTK/Treebank word
rules), re-implemented for ``--chair-rules official`` without nltk or its downloaded data.

Only what can change a CHAIR mention is reproduced. A token can be an object form only if it is all letters, so what
matters is which letter runs end up as tokens of their own and which tokens are neighbours (a two-word phrase needs
two neighbouring tokens). As in nltk (3.9/3.10), these are split off as tokens of their own:

* ``"``, ``''``, curly quotes, backquotes, ``; @ # $ % &``, ``? !``, ``*``, brackets ``( ) [ ] { } < >``, the dashes
  U+2012-U+2015, ``--`` and runs of two or more periods ("cat...dog" is three tokens);
* ``,`` and ``:`` unless a digit follows ("1,000" and "3:30" stay whole; so does "dog,5");
* the period that ends a sentence. Punkt ends a sentence at a period after a word that is not an abbreviation when
  whitespace, the end of the text or one of ``? ! ) " ; } ] * : @ ' ( { [`` follows; a period followed by a letter,
  digit, ``,``, ``-`` or ``/`` stays on its word ("sofa.the" is one token). No CHAIR form is one of Punkt's English
  abbreviations, so its abbreviation list never decides a mention and is not needed;
* apostrophes: an opening quote before a word ("'dog'" -> ``'``, ``dog``, ``'``), and the endings ``'s 'm 'd 'll
  're 've n't`` and a bare ``'`` at the end of a word ("dog's" -> ``dog``, ``'s``; "dogs'" -> ``dogs``, ``'``).

Everything else stays inside its token: hyphens ("man-made", "vase-like"), slashes ("cat/dog"), underscores,
digits ("2dogs"), ``+ = ~ ^ |`` and a single period inside a word. Not reproduced, because they never touch a form:
nltk's contraction splits ("cannot" -> "can", "not"), the ```` `` ```` / ``''`` renaming of double quotes, and
"?"/"!" straight after a sentence's period in mid-text (".?" then a space keeps the period on its word in nltk).
"""

from __future__ import annotations

import re

# characters and runs that always become tokens of their own
_ALWAYS_APART = re.compile(r"""\.{2,}|--|''|[“”‘’«»„`"]|[;@#$%&?!*\[\](){}<>]|[\u2012-\u2015]""")
_COMMA_COLON = re.compile(r"([:,])([^\d])")  # consumes the next character, as nltk does (",," splits only once)
_COMMA_COLON_AT_END = re.compile(r"([:,])$")
# a single period after a non-period that ends a Punkt sentence (see the module docstring)
_SENTENCE_PERIOD = re.compile(r"""(?<=[^.])\.(?=\s|$|[?!)";}\]*:@'({\[])""")
# a period that ends the text once trailing closing quotes and brackets are set aside
_FINAL_PERIOD = re.compile(r"""(?<=[^.])\.(?=[\]\)}>"'»”’]*\s*$)""")
_OPENING_QUOTE = re.compile(r"(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
_QUOTE_BEFORE_SPACE = re.compile(r"([^'])' ")
_CLITIC = re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|'|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ")


def _split_sentence_periods(text: str) -> str:
    """Space out every period that ends a Punkt sentence: a sentence's last period is split off by the word rules."""
    return _FINAL_PERIOD.sub(" . ", _SENTENCE_PERIOD.sub(" . ", text))


def official_tokens(caption: str) -> list[str]:
    """The tokens ``nltk.word_tokenize`` gives for ``caption``, as far as CHAIR mentions can tell them apart."""
    text = _OPENING_QUOTE.sub("' ", caption)
    text = _COMMA_COLON.sub(r" \1 \2", text)
    text = _COMMA_COLON_AT_END.sub(r" \1 ", text)
    text = _ALWAYS_APART.sub(lambda m: f" {m.group(0)} ", text)
    text = _split_sentence_periods(text)
    text = " " + re.sub(r"\s+", " ", text) + " "
    text = _QUOTE_BEFORE_SPACE.sub(r"\1 ' ", text)
    text = _CLITIC.sub(r"\1 \2 ", text)
    return text.split()
