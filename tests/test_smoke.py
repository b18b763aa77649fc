"""The server answers a chat message end to end."""

from support import RunningServer, connect


async def test_room_chat_reaches_everyone(server: RunningServer) -> None:
    """A room message is delivered to every member, the sender included."""
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        await alice.send({"type": "chat_message", "room": "Lobby", "payload": {"content": "hi"}})
        for peer in (alice, bob):
            message = await peer.expect("chat_message")
            assert "alice" == message["fromUser"]
            assert {"content": "hi"} == message["payload"]
