"""Reading features: streaming statistics (stats.py), the report with contexts, lens and search
(report.py), HTML cards for the browser and Jupyter (dashboard.py), and anomaly scores, the tokens a
model reconstructs worst (anomaly.py). Reads a trained model and its store; imports no other stage."""
from saekit.analysis.anomaly import token_scores, worst_contexts  # noqa: F401
from saekit.analysis.dashboard import Example, FeatureCard, write_dashboard  # noqa: F401
from saekit.analysis.report import FeatureReport, analyze_run  # noqa: F401
