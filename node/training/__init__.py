"""The node's part in federated training.

``policy`` is the site's training policy (which app bundles it runs, whether runs
wait for an operator, which exams are eligible); ``runs`` keeps each run's
decision in the node index; ``cohort`` builds the sample manifest a run may read;
``gate`` stands in for Flower's ``flwr-clientapp`` so that no app code runs on
the node unless the policy accepted its run; ``supernode`` supervises the node's
Flower SuperNode.
"""
