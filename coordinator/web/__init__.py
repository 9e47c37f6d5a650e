"""The coordinator's web UI: server-rendered pages mounted at ``/ui`` (see ``ui``).

``ui`` builds the mounted application (templates, security headers, HTML
errors, who may see what); ``session`` and ``session_pages`` sign operators and
researchers in with their API tokens; ``site_pages``, ``registry_pages``,
``run_pages`` and ``audit_pages`` are the pages, each calling the same service
functions as the API; ``plots`` draws charts as SVG, ``views`` shapes what the
pages show and ``thumbnails`` renders de-identified images. The templates and
the static assets sit beside them: nothing is fetched from anywhere else.
"""
