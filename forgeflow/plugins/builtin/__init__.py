"""ForgeFlow's built-in vision plugins (entry points in ``pyproject.toml``, like any plugin).

* ``forgesyte-yolo-tracker`` (alias ``videotracker``): ``detect_players``, ``track_players`` → ``players``
* ``pose-estimator`` (alias ``pose``): ``estimate_poses`` (``media`` + ``players``) → ``poses``
* ``classifier``: ``classify_actions`` (``poses``, optional ``media``) → ``actions``

The soccer pipeline (``examples/soccer-analysis.json``) chains the three; its result is
``{players, poses, actions}``, one entry per processed frame each (see :mod:`.schemas`).
A job draws its result onto its image or video itself (``forgeflow.jobs.annotate``);
``forgeflow.cli.sample_clip.make_sample_clip`` makes the offline sample video. Importing these
modules stays light: torch and Ultralytics load inside the tools, in the worker that runs them.
"""
