"""``metalserve autoscale``: promote and retire warm standbys from the replicas' own metrics.

A standby is a replica that HAProxy health-checks but gives no traffic: its server's weight in
the configuration is 0 (``model_replica_standby``). The controller, one per load balancer (it
acts on that HAProxy only, through its admin socket), evaluates every ``interval`` seconds:

* ``policy``: the decision from the load per replica in rotation (running and waiting requests,
  ``metalserve_num_requests_running`` + ``metalserve_num_requests_waiting``; optionally the TTFT
  p99 too), with two thresholds (hysteresis), a number of consecutive evaluations before acting,
  a cooldown after every action, and the bounds ``min_active``/``max_active``;
* ``prometheus``: the one query client (``/api/v1/query``);
* ``haproxy``: the runtime API (``show servers state``, ``set server ... weight``);
* ``controller``: the loop, a log line and a metric for every decision.

Only servers configured with weight 0 are ever changed: the replicas the inventory puts in rotation
are never taken out. Promoting sets weight 100 (the weight of every other server); retiring sets
0, which lets the requests in flight finish (HAProxy only stops sending new ones). Like the rest of
the product commands it imports neither torch nor transformers.
"""
