import os
import sys

# Tests run from the repository root without needing an install for labelstore itself.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
