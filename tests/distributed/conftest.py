def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: launches real torchrun processes (gloo, 2 ranks)")
