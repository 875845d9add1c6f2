"""The command-line shells: ``aoi-train`` (``train.py``) and ``aoi-evaluate`` (``evaluate.py``); each module's
``main(argv=None)`` parses argv, makes one library call and writes the report files (setup.cfg
``console_scripts``; the top-level ``train.py`` and ``evaluate.py`` of a checkout call the same ``main``)."""
