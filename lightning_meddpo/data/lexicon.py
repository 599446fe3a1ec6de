"""The visual-misinterpretation lexicon used by `pairs.perturb_answer` (plain data, JSON-compatible).

Kept as a Python module rather than a .json file so it always ships with the package (no package-data
configuration needed). `json.dumps(LEXICON)` gives the same content as JSON; `pairs.perturb_answer`
accepts any lexicon of this shape, so a user can load their own from a file.

Per error type, any of:
  "swaps":  bidirectional pairs [a, b]: a -> b and b -> a
  "rules":  one-directional rewrites [source, target]
  "groups": lists of interchangeable terms: any member -> another member not already in the answer
  "start_only": one-directional rewrites applied only at the very start of the answer ("Yes, ..." -> "No, ...")
  "mirror": true -> every swap term found is swapped at once (left <-> right everywhere, so "left larger
            than right" becomes "right larger than left"); otherwise one term is chosen and every
            occurrence of it is replaced
  "numbers": true -> a numeral in the answer may be changed (doubled, halved, +1 or -1)
Terms are matched as whole words, case-insensitively; the replacement follows the case of the matched text
(see `pairs._match_case`). Longer terms win over shorter ones at the same position.
"""

from __future__ import annotations

from typing import Any

LEXICON: dict[str, dict[str, Any]] = {
    "laterality": {
        "mirror": True,
        "swaps": [
            ["left", "right"],
            ["left-sided", "right-sided"],
            ["left sided", "right sided"],
            ["leftward", "rightward"],
            ["bilateral", "unilateral"],
            ["bilaterally", "unilaterally"],
            ["ipsilateral", "contralateral"],
        ],
    },
    "anatomy": {
        "groups": [
            ["lung", "liver", "kidney", "brain", "heart", "spleen", "pancreas", "stomach", "bladder", "colon",
             "gallbladder", "thyroid gland", "prostate", "uterus", "ovary", "breast", "esophagus", "adrenal gland"],
            ["lungs", "kidneys", "ovaries", "breasts", "adrenal glands"],
            ["pulmonary", "hepatic", "renal", "cerebral", "cardiac", "splenic", "pancreatic", "gastric",
             "colonic", "adrenal", "prostatic", "esophageal"],
            ["chest", "abdomen", "pelvis", "head", "neck"],
            ["thoracic", "abdominal", "pelvic", "cervical", "cranial"],
            ["frontal lobe", "parietal lobe", "temporal lobe", "occipital lobe", "cerebellum"],
        ],
        "swaps": [
            ["upper", "lower"],
            ["superior", "inferior"],
            ["anterior", "posterior"],
            ["medial", "lateral"],
            ["proximal", "distal"],
        ],
    },
    "modality": {
        "groups": [
            ["CT", "MRI", "X-ray", "ultrasound", "PET"],
            ["computed tomography", "magnetic resonance imaging", "radiography", "ultrasonography",
             "positron emission tomography"],
            ["CT scan", "MRI scan", "PET scan", "ultrasound scan"],
            ["radiograph", "CT image", "MR image", "sonogram"],
        ],
        "swaps": [["T1-weighted", "T2-weighted"], ["contrast-enhanced", "non-contrast"]],
    },
    "presence": {
        "rules": [
            ["there is no", "there is"],
            ["there are no", "there are"],
            ["there is a", "there is no"],
            ["there is an", "there is no"],
            ["there is", "there is no"],
            ["there are", "there are no"],
            ["no evidence of", "evidence of"],
            ["no signs of", "signs of"],
            ["no sign of", "a sign of"],
            ["without evidence of", "with evidence of"],
            ["is present", "is absent"],
            ["are present", "are absent"],
            ["is absent", "is present"],
            ["are absent", "are present"],
            ["is seen", "is not seen"],
            ["are seen", "are not seen"],
            ["is not seen", "is seen"],
            ["are not seen", "are seen"],
            ["is visible", "is not visible"],
            ["is not visible", "is visible"],
            ["shows no", "shows"],
            ["reveals no", "reveals"],
            ["normal", "abnormal"],
            ["abnormal", "normal"],
            ["unremarkable", "abnormal"],
            ["negative", "positive"],
            ["positive", "negative"],
        ],
        "start_only": [["yes", "no"], ["no", "yes"]],
    },
    "size_count": {
        "swaps": [
            ["small", "large"],
            ["smaller", "larger"],
            ["single", "multiple"],
            ["few", "many"],
        ],
        "rules": [
            ["tiny", "large"],
            ["big", "small"],
            ["solitary", "multiple"],
            ["enlarged", "normal-sized"],
        ],
        "groups": [["one", "two", "three", "four", "five", "six"]],
        "numbers": True,
    },
}

ERROR_TYPES: tuple[str, ...] = tuple(LEXICON)
