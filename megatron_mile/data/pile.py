"""The Pile's domains: sampling weights and Megatron ``--data-path`` blends built from per-domain datasets.

The weights shipped in ``pile_sampling_weights.json`` are the MiLe paper's sampling rates over the 22 Pile
domains (keys are the Pile's ``meta.pile_set_name`` values). A blend for Megatron's ``--data-path`` is the
flat list ``["w1", "prefix1", "w2", "prefix2", ...]``; the weights are renormalised over the domains that are
actually present, so training on a subset keeps the subset's relative proportions.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Mapping, Optional

from megatron_mile.data.indexed_writer import dataset_exists
from megatron_mile.data.preprocess import dataset_prefix, sanitize_domain

DEFAULT_WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pile_sampling_weights.json")


class BlendError(ValueError):
    """A blend cannot be built; the message names the domain or prefix at fault."""


def load_weights(path: Optional[str] = None) -> Dict[str, float]:
    """Domain -> weight from a JSON object (keys starting with '_' are comments); default: the Pile's."""
    path = path or DEFAULT_WEIGHTS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as err:
        raise BlendError(f"cannot read the weights file {path!r}: {err.strerror}") from err
    except ValueError as err:
        raise BlendError(f"weights file {path!r} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise BlendError(f"weights file {path!r} must hold a JSON object of domain -> weight")
    weights = {}
    for name, value in raw.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise BlendError(f"weights file {path!r}: weight of {name!r} must be a non-negative number, got {value!r}")
        weights[name] = float(value)
    return weights


def blend_data_path(domain_prefixes: Mapping[str, str], weights: Optional[Mapping[str, float]] = None,
                    check_files: bool = True) -> List[str]:
    """Megatron's --data-path list for the given per-domain dataset prefixes.

    Args:
        domain_prefixes: Pile domain name -> dataset prefix (``{prefix}.bin``/``.idx``).
        weights: domain -> sampling weight; default: the Pile weights shipped with this package.
        check_files: require both ``.bin`` and ``.idx`` of every prefix to exist.

    Returns:
        ``["w1", "prefix1", ...]`` in the order of ``domain_prefixes``, weights summing to 1, as strings.

    Raises:
        BlendError: no domains, a domain without a (positive) weight, or a missing .bin/.idx.
    """
    if weights is None:
        weights = load_weights()
    if not domain_prefixes:
        raise BlendError("no domain datasets given")
    missing = [d for d in domain_prefixes if d not in weights]
    if missing:
        raise BlendError(f"no sampling weight for domain(s) {missing}; known domains: {sorted(weights)}. "
                         "Add them to the weights file or rename the datasets to Pile domain names.")
    if check_files:
        for domain, prefix in domain_prefixes.items():
            absent = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
            if absent:
                raise BlendError(f"domain {domain!r}: dataset {prefix!r} is missing {', '.join(absent)}; "
                                 "run tools/preprocess_data.py for it first")
    total = sum(weights[d] for d in domain_prefixes)
    if total <= 0:
        raise BlendError(f"the weights of {list(domain_prefixes)} sum to zero; nothing would be sampled")
    blend: List[str] = []
    for domain, prefix in domain_prefixes.items():
        blend += [repr(weights[domain] / total), prefix]
    return blend


def domain_prefixes_from_preprocess(output_prefix: str, domains, key: str = "text",
                                    split_sentences: bool = False) -> Dict[str, str]:
    """Domain -> dataset prefix as ``tools/preprocess_data.py --split-by-domain`` names them."""
    return {d: dataset_prefix(output_prefix, key, split_sentences, d) for d in domains}


def discover_domain_prefixes(output_prefix: str, weights: Mapping[str, float], key: str = "text",
                             split_sentences: bool = False) -> Dict[str, str]:
    """The domains of ``weights`` for which ``--split-by-domain`` output exists under ``output_prefix``."""
    found = domain_prefixes_from_preprocess(output_prefix, weights, key, split_sentences)
    return {d: p for d, p in found.items() if dataset_exists(p)}


def domain_of_prefix(prefix: str, domains=None) -> str:
    """The Pile domain a dataset prefix was written for by ``--split-by-domain``, else the prefix's file name.

    ``/d/pile_Wikipedia_en_text_document`` -> ``"Wikipedia (en)"`` when that domain is among ``domains``
    (default: the domains of the shipped Pile weights). The longest matching domain wins, so a domain whose
    file-name form ends another's is never mistaken for it.
    """
    name = os.path.basename(prefix.rstrip("/"))
    candidates = []
    for domain in domains if domains is not None else load_weights():
        tag = sanitize_domain(domain)
        if re.search(rf"_{re.escape(tag)}_[^_]+_(document|sentence)$", name):
            candidates.append((len(tag), domain))
    return max(candidates)[1] if candidates else name
