"""Input formats of `align-data build --format NAME`: one module per public schema."""

from __future__ import annotations

from align.core.errors import ConfigError
from data_tools.sources.base import Format, SourceOptions
from data_tools.sources.generic import Ranked, Ratings, make_generic
from data_tools.sources.helpsteer import HelpSteer
from data_tools.sources.hh_rlhf import HHRLHF
from data_tools.sources.nectar import Nectar
from data_tools.sources.oasst import OASST
from data_tools.sources.pku_saferlhf import PKUSafeRLHF
from data_tools.sources.preference_rows import Pairs, PreferenceRows, UltraFeedbackBinarized
from data_tools.sources.shp import SHP
from data_tools.sources.thumbs import Thumbs
from data_tools.sources.ultrafeedback import UltraFeedback

FORMATS: dict[str, type[Format]] = {
    cls.name: cls
    for cls in (
        HHRLHF, UltraFeedback, UltraFeedbackBinarized, PreferenceRows, SHP, HelpSteer,
        Nectar, PKUSafeRLHF, OASST, Pairs, Ratings, Ranked, Thumbs,
    )
}
ALIASES = {"helpsteer2": "helpsteer", "oasst1": "oasst", "oasst2": "oasst", "shp-2": "shp", "unpaired": "thumbs"}


def make_format(name: str, opts: SourceOptions | None = None) -> Format:
    opts = opts or SourceOptions()
    cls = FORMATS.get(ALIASES.get(name, name))
    if cls is None:
        raise ConfigError(f"--format: unknown format {name!r} (formats: {', '.join(FORMATS)})")
    if cls in (Ratings, Ranked):
        return make_generic(cls, opts)
    return cls(opts)
