defmodule UroRecs.FakeBroker do
  @moduledoc """
  A scripted stand-in for the broker's client socket, for testing the client's own mechanics
  (ids, retries, reconnects, liveness, malformed replies) where the real broker cannot be
  made to misbehave on cue. It listens on a Unix socket, speaks ZMTP as a ROUTER (with
  `UroRecs.ZMTP` reading the client) and passes every decoded request to `handler`:

      handler.(request_map, connection_number) ::
        {:reply, reply_map} | {:replies, [reply_map]} | :noreply | :close

  Every request is also sent to the owner as `{:fake_request, connection_number, request}`,
  and every accepted connection as `{:fake_connected, connection_number}`. With
  `answer_pings: false` PINGs go unanswered (a hung broker).
  """

  alias UroRecs.{Msgpack, ZMTP}

  @router_ready <<4, 0x29, 5, "READY", 11, "Socket-Type", 6::32, "ROUTER", 8, "Identity", 0::32>>

  @spec start(keyword()) :: %{path: binary(), endpoint: binary(), pid: pid()}
  def start(opts) do
    path = Path.join(System.tmp_dir!(), "fake-#{System.unique_integer([:positive])}.sock")
    owner = self()
    handler = Keyword.fetch!(opts, :handler)
    answer_pings = Keyword.get(opts, :answer_pings, true)
    {:ok, listener} = :gen_tcp.listen(0, [:binary, ifaddr: {:local, path}, active: false])
    pid = spawn_link(fn -> accept(listener, owner, handler, answer_pings, 1) end)
    :ok = :gen_tcp.controlling_process(listener, pid)
    %{path: path, endpoint: "ipc://" <> path, pid: pid}
  end

  @spec stop(%{path: binary(), pid: pid()}) :: :ok
  def stop(%{path: path, pid: pid}) do
    Process.unlink(pid)
    Process.exit(pid, :kill)
    File.rm(path)
    :ok
  end

  @doc "A reply map answering `request` with `result`."
  def ok(request, result),
    do: %{"v" => 1, "id" => request["id"], "ok" => true, "result" => result}

  @doc "A reply map answering `request` with an error."
  def error(request, code, retry \\ false) do
    error = %{"code" => code, "message" => "scripted #{code}", "retry" => retry}
    %{"v" => 1, "id" => request["id"], "ok" => false, "error" => error}
  end

  defp accept(listener, owner, handler, answer_pings, n) do
    {:ok, socket} = :gen_tcp.accept(listener)
    send(owner, {:fake_connected, n})
    connection = spawn_link(fn -> serve(owner, handler, answer_pings, n) end)
    :ok = :gen_tcp.controlling_process(socket, connection)
    send(connection, {:socket, socket})
    accept(listener, owner, handler, answer_pings, n + 1)
  end

  defp serve(owner, handler, answer_pings, n) do
    socket =
      receive do
        {:socket, socket} -> socket
      end

    :ok = :gen_tcp.send(socket, [ZMTP.greeting(), @router_ready])
    loop(socket, ZMTP.new(peer_socket_type: "DEALER"), owner, handler, answer_pings, n)
  end

  defp loop(socket, decoder, owner, handler, answer_pings, n) do
    case :gen_tcp.recv(socket, 0) do
      {:ok, bytes} ->
        {:ok, decoder, events} = ZMTP.feed(decoder, bytes)

        if Enum.all?(events, &handle(&1, socket, owner, handler, answer_pings, n)) do
          loop(socket, decoder, owner, handler, answer_pings, n)
        else
          :gen_tcp.close(socket)
        end

      {:error, _closed} ->
        :ok
    end
  end

  defp handle({:message, ["", body]}, socket, owner, handler, _answer_pings, n) do
    request = Msgpack.decode!(body)
    send(owner, {:fake_request, n, request})

    case handler.(request, n) do
      {:reply, reply} ->
        :ok = :gen_tcp.send(socket, ZMTP.encode_request(Msgpack.encode!(reply)))
        true

      {:replies, replies} ->
        :ok = :gen_tcp.send(socket, Enum.map(replies, &ZMTP.encode_request(Msgpack.encode!(&1))))
        true

      :noreply ->
        true

      :close ->
        false
    end
  end

  defp handle({:ping, _ttl, context}, socket, _owner, _handler, true, _n) do
    :ok = :gen_tcp.send(socket, ZMTP.pong(context))
    true
  end

  defp handle(_event, _socket, _owner, _handler, _answer_pings, _n), do: true
end
