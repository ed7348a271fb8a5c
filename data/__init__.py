"""What the three scripts read and check before they work: the data path (pairs.py), the command line (settings.py),
reward labels (label.py), the judge's HTTP client (judge_client.py), and one folder per data set with its prepare.py."""
