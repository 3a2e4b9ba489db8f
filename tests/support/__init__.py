"""The test harness, shared by every folder: the loop x relay-path matrix (:mod:`.matrix`)
and the one polling helper (:mod:`.waiting`).

Test files import them as ``tests.support.matrix`` and ``tests.support.waiting`` from
whichever folder they live in.
"""
