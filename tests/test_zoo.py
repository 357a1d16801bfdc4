"""Every zoo case x every check, with the loader given by --loader (stock by default)."""


def test_zoo(fsdp_case, fsdp_check, fsdp_suite):
    fsdp_suite.expect(fsdp_case, fsdp_check)
