"""Finding and scrubbing personal data in text with Presidio's pattern recognizers.

Presidio's NER-based entities (PERSON, LOCATION) need a spaCy model download, which fedsov
never does; pattern recognizers need none. Formats Presidio lacks (Chinese resident ID,
Dutch BSN, French NIR, international phone numbers that libphonenumber rejects as unassigned)
are added as Presidio PatternRecognizers.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass

SUPPORTED_ENTITIES = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "IBAN_CODE",
    "CREDIT_CARD",
    "IP_ADDRESS",
    "US_SSN",
    "SG_NRIC_FIN",
    "DE_TAX_ID",
    "ES_NIF",
    "IT_FISCAL_CODE",
    "FR_NIR",
    "NL_BSN",
    "CN_RESIDENT_ID",
)
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IT", "ES", "NL", "SG", "CN")


@dataclass(frozen=True)
class PiiSpan:
    entity: str
    start: int
    end: int
    text: str


def _custom_patterns():
    from presidio_analyzer import Pattern, PatternRecognizer

    def recognizer(entity: str, regex: str, score: float = 0.6):
        return PatternRecognizer(supported_entity=entity, patterns=[Pattern(entity.lower(), regex, score)])

    return {
        "CN_RESIDENT_ID": recognizer("CN_RESIDENT_ID", r"\b\d{17}[\dXx]\b"),
        "NL_BSN": recognizer("NL_BSN", r"\b\d{9}\b", 0.3),
        "FR_NIR": recognizer("FR_NIR", r"\b[12]\d{2}(0[1-9]|1[0-2])\d{2}[0-9AB]?\d{3}\d{3}(\d{2})?\b", 0.5),
        # International and national phone formats (with separators), whether or not the
        # number is assigned: test data and typos are personal data too.
        "PHONE_NUMBER": recognizer(
            "PHONE_NUMBER",
            r"(?<![\w-])(\+\d{1,3}[\s.-]?)?(\(\d{1,5}\)[\s.-]?|\d{2,5}[\s.-])\d{2,5}([\s.-]\d{2,5}){0,3}(?![\w-])",
            0.4,
        ),
    }


@functools.cache
def _recognizers(entities: tuple[str, ...]):
    import tldextract
    from presidio_analyzer import predefined_recognizers as pr

    class OfflineEmailRecognizer(pr.EmailRecognizer):
        # Presidio's default check would fetch the public suffix list; use the bundled snapshot.
        _extract = tldextract.TLDExtract(suffix_list_urls=())

        def validate_result(self, pattern_text: str):  # noqa: D102
            return self._extract(pattern_text).fqdn != ""

    custom = _custom_patterns()
    built = {
        "EMAIL_ADDRESS": lambda: [OfflineEmailRecognizer()],
        "PHONE_NUMBER": lambda: [pr.PhoneRecognizer(supported_regions=PHONE_REGIONS), custom["PHONE_NUMBER"]],
        "IBAN_CODE": lambda: [pr.IbanRecognizer()],
        "CREDIT_CARD": lambda: [pr.CreditCardRecognizer()],
        "IP_ADDRESS": lambda: [pr.IpRecognizer()],
        "US_SSN": lambda: [pr.UsSsnRecognizer()],
        "SG_NRIC_FIN": lambda: [pr.SgFinRecognizer()],
        "DE_TAX_ID": lambda: [pr.DeTaxIdRecognizer()],
        "ES_NIF": lambda: [pr.EsNifRecognizer()],
        "IT_FISCAL_CODE": lambda: [pr.ItFiscalCodeRecognizer()],
        "FR_NIR": lambda: [custom["FR_NIR"]],
        "NL_BSN": lambda: [custom["NL_BSN"]],
        "CN_RESIDENT_ID": lambda: [custom["CN_RESIDENT_ID"]],
    }
    return [(entity, r) for entity in entities for r in built[entity]()]


class PiiDetector:
    def __init__(self, entities: Sequence[str] = SUPPORTED_ENTITIES):
        unknown = sorted(set(entities) - set(SUPPORTED_ENTITIES))
        if unknown:
            raise ValueError(f"Unknown PII entity types {unknown}; supported: {', '.join(SUPPORTED_ENTITIES)}")
        self.entities = tuple(entities)

    def find(self, text: str) -> list[PiiSpan]:
        """Non-overlapping detected spans, longest first where they overlap, in text order."""
        found = []
        for entity, recognizer in _recognizers(self.entities):
            for result in recognizer.analyze(text, entities=[entity], nlp_artifacts=None):
                if result.end > result.start:  # an empty match hides nothing
                    found.append(PiiSpan(entity, result.start, result.end, text[result.start : result.end]))
        # Kept spans never overlap, so sorted by start they are sorted by end too: a candidate need only be
        # checked against its two neighbours (a scan of every kept span made large records take hours).
        spans: list[PiiSpan] = []
        starts: list[int] = []
        for span in sorted(found, key=lambda s: (-(s.end - s.start), s.start)):
            i = bisect.bisect_left(starts, span.start)
            if (i == 0 or spans[i - 1].end <= span.start) and (i == len(spans) or spans[i].start >= span.end):
                spans.insert(i, span)
                starts.insert(i, span.start)
        return spans

    def scrub(self, text: str, spans: Sequence[PiiSpan] | None = None) -> str:
        """The text with every detected span (or the given ones) replaced by its entity type in brackets."""
        out, last = [], 0
        for span in self.find(text) if spans is None else spans:
            out.append(text[last : span.start])
            out.append(f"[{span.entity}]")
            last = span.end
        out.append(text[last:])
        return "".join(out)
