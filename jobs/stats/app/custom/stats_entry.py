"""What the federated statistics job names as each site's statistics generator: ``custom/stats_entry.py``.

The generator itself lives in the installed package (``fedseg.app.site_statistics``); this launcher
is what the job carries, as ``site_entry.py`` is for training. A job with custom code is one the
lead may submit (NVFlare's ``byoc`` right); one without would have to pass each site's component
allow-list, which does not name fedseg.
"""

from fedseg.app.site_statistics import SiteImageStatistics as _SiteImageStatistics


class SiteImageStatistics(_SiteImageStatistics):
    """``fedseg.app.site_statistics.SiteImageStatistics`` (see there)."""
