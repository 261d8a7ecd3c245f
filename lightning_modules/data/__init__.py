"""Data layer: layouts, label conventions, datalists, site splits, synthetic sites, preprocessing."""
