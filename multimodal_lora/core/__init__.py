"""What everything else stands on, with no knowledge of models, recipes or data.

Errors the user can act on (:mod:`.errors`), whole-or-nothing writes (:mod:`.atomic`), no
unasked hub requests (:mod:`.offline`), host memory (:mod:`.host_memory`), how a process logs
(:mod:`.log_setup`), the runtime facts (:mod:`.runtime`: dtypes, devices), the quantization
table (:mod:`.quantization`), the tasks (:mod:`.tasks`), generation options
(:mod:`.generation`) and the captioning metrics (:mod:`.metrics`).
"""
