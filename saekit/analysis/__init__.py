"""Reading features: streaming statistics (stats.py), the report with contexts, lens and search
(report.py), and HTML cards for the browser and Jupyter (dashboard.py)."""
from saekit.analysis.dashboard import Example, FeatureCard, write_dashboard  # noqa: F401
from saekit.analysis.report import FeatureReport, analyze_run  # noqa: F401
