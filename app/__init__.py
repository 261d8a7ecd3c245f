"""Code that runs inside NVFlare: the site training script, site-local configuration and the
server-side components fedseg owns. Imports ``fedseg.lightning_modules``, never the reverse."""
