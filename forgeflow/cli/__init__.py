"""The ``forgeflow`` command (:mod:`.main`) and the media helpers only it uses: drawing a result onto
its media (:mod:`.annotate`) and making the offline sample clip (:mod:`.sample_clip`)."""
