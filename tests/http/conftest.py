from http_fixtures import (  # noqa: F401 (fixtures)
    default_model_dir,
    make_server,
    tiny_llm,
    tiny_model_dir,
    tiny_ref,
)
