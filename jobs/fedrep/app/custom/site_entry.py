"""What NVFlare runs at each site: the job's ``custom/site_entry.py``.

The site logic lives in the installed package (``fedseg.app.site_runner``), so an exported job
folder carries only this launcher: it stays small and does not go stale when the site code changes.
NVFlare runs the file with ``runpy.run_path(..., run_name="__main__")`` and the job's arguments in
``sys.argv``.
"""

from fedseg.app.site_runner import main

if __name__ == "__main__":
    main()
