"""uproxy's tests, one folder per concept:

- ``core``: the pure core (model, state, balance, rules), no sockets;
- ``relay``: the TCP data path: the relay contract on both twins, the compiled module,
  TCP services in the lab;
- ``udp``: the flow table, the UDP proxy on loopback, UDP services in the lab;
- ``sources``: manifest files; ``k8s``: the Kubernetes API source against the fake API
  server (``tests/k8s/apiserver.py``, also a program the benchmark runs);
- ``status``: the status server, ``uproxy get``, and the page in ``browser``;
- ``lab``: the namespace lab itself and the demo walkthrough;
- ``deploy``: the manifests in deploy/ and the compose stack;
- ``tools``: the command line, its settings, the benchmark's parsing and reports;
- ``support``: the harness: the loop x relay-path matrix and the polling helper.

A package, so every module imports the same way under pytest and when run as a program
(``python -m tests.k8s.test_kube_lab``). Tests that need root get the ``lab`` marker
(tests/conftest.py); ``-m "not lab"`` runs the rest.
"""
