"""The fleet manager's dashboard: server-rendered HTML pages with inline SVG charts.

The routes are in :mod:`fleet.routes.dashboard`; the pages, charts and the browser session live
here. No JavaScript framework and nothing fetched from elsewhere: everything is served by the
fleet manager itself.
"""
