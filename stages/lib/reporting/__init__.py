"""The report stage's machinery: what it reads (``data``), its figures (``figures``), the rollout
browser's data (``browser``) and the HTML page (``page``). ``stages/report.py`` builds the report."""
