"""The learner picks its own ports at bind time (no window in which another process can take them)."""

import asyncio

from learner.coordinator import Coordinator, DataStream
from protocol import messages as m
from protocol.transport import ActorClient, LearnerServer, read_endpoint_file


def test_port_zero_binds_a_free_pair_and_actors_find_it_through_the_endpoint_file(tmp_path):
    servers = []
    try:
        for i in range(3):
            c = Coordinator(DataStream([{"question": "q"}], shuffle=False, seed=0), batch_groups=1, group_size=1, max_staleness=0, peer_timeout_s=60)
            servers.append(LearnerServer(c, "127.0.0.1", 0))
            servers[-1].write_endpoint(tmp_path / f"learner{i}.json", "127.0.0.1")
        ports = {s.port for s in servers}
        assert len(ports) == 3 and all(20000 <= p < 64000 for p in ports)
        host, port = read_endpoint_file(tmp_path / "learner1.json", timeout_s=1)
        assert (host, port) == ("127.0.0.1", servers[1].port)
        client = ActorClient(host, port)
        try:
            welcome = asyncio.run(client.call(m.Register(actor_id="a0", host="h", pid=1, engine="x"), timeout_s=5))
        finally:
            client.close()
        assert isinstance(welcome, m.Welcome) and "a0" in servers[1].handler.actors
    finally:
        for s in servers:
            s.close()


def test_waiting_for_a_missing_endpoint_file_names_it(tmp_path):
    import pytest

    from protocol.transport import TransportTimeout

    with pytest.raises(TransportTimeout, match="learner.json"):
        read_endpoint_file(tmp_path / "learner.json", timeout_s=0.3)
