import os
import sys

# Tests run from the repository root without needing an install for labelstore itself.
# Test helpers (_teachers, store_factory) live in tests/, beside the per-stage test folders.
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for path in (ROOT, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads crawl on a busy 2-core machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free local port for the whole session; its address is put in the environment
    (``AWS_ENDPOINT_URL`` and test credentials), so labelstore, s3fs and child processes all reach it."""
    pytest.importorskip("s3fs", reason="s3fs is a dev dependency: make test installs it")
    from s3_server import S3Server

    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    server.apply_env()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A new, empty bucket on the session's S3 server; yields its name."""
    import re
    import uuid

    from s3_server import make_bucket

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    make_bucket(name)
    return name
