"""The ``forgeflow`` command (:mod:`.main`) and making the offline sample clip (:mod:`.sample_clip`).
A job's annotated media is made by the job itself (:mod:`forgeflow.jobs.annotate`)."""
