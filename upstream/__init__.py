"""Run third-party test suites (SQLAlchemy's, Flask-SQLAlchemy's) with and without hybridinval.

The point is to show that ``hybridinval.sqlalchemy`` is invisible to the libraries it hooks
into: every test that passes without the integration must still pass with it. See
``python -m upstream.sqlalchemy_suite --help`` and ``python -m upstream.flask_sqlalchemy_suite``.
"""
