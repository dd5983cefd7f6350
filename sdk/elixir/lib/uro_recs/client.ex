defmodule UroRecs.Client do
  @moduledoc """
  One connection to the broker's client socket, shared by any number of callers.

  The process speaks ZMTP 3.x as a DEALER (`UroRecs.ZMTP`) over `:gen_tcp`, to a Unix socket
  (`endpoint: "ipc:///run/uro-recs/client.sock"`) or loopback TCP
  (`endpoint: "tcp://127.0.0.1:5555"`). Callers use the functions of `UroRecs`; each call
  becomes one request with an id unique on this connection, and replies are matched by id, in
  whatever order they come back.

  What it does for its callers:

    * **Budgets.** Each call has a deadline (`timeout`, default 1000 ms), sent as the request's
      `timeout_ms` (what is left of it on every attempt). The caller gets an answer by the
      deadline, whatever happens to the connection: `:deadline_exceeded` when connected but
      unanswered, `:unavailable` (retryable) when the broker could not be reached.
    * **Retries.** A reply with `retry: true` (`:overloaded`, `:unavailable`, `:worker_lost`)
      is sent again after a jittered backoff (half to all of
      `min(retry_backoff * 2^(k-1), retry_max_backoff)` before retry k), at most
      `retry_attempts` attempts in all, and never when the backoff would reach the deadline.
    * **Reconnects.** When the connection drops (the broker restarts, say) the client connects
      again with a jittered backoff from `reconnect_backoff` up to `reconnect_max_backoff`,
      and sends again every request that was in flight or arrived meanwhile, each with what
      is left of its budget. Every op is read-only or idempotent, so this is safe; replies
      to the lost connection are gone with it.
    * **Liveness.** Every `ping_interval` without traffic it sends a ZMTP PING; a broker that
      sends nothing at all for `liveness_timeout` (a PING's PONG counts) is taken as gone:
      the connection is closed and opened again. A handshake that does not finish within
      `liveness_timeout` is treated the same way.
    * **Bounds.** At most `max_in_flight` requests (default 1024, the broker's own
      per-connection bound) are held, counting those waiting for a connection; past that a
      call gets `:overloaded` at once. A reply frame larger than `max_reply_bytes` closes the
      connection.

  Requests that arrive while the process is busy are written to the socket together, in one
  `:gen_tcp.send/2`.
  """

  use GenServer

  alias UroRecs.{Error, Msgpack, ZMTP}

  @defaults [
    endpoint: "ipc:///run/uro-recs/client.sock",
    model: nil,
    timeout: 1_000,
    max_in_flight: 1_024,
    retry_attempts: 3,
    retry_backoff: 5,
    retry_max_backoff: 250,
    reconnect_backoff: 10,
    reconnect_max_backoff: 1_000,
    connect_timeout: 1_000,
    ping_interval: 1_000,
    liveness_timeout: 3_000,
    max_reply_bytes: 64 * 1024 * 1024,
    codec: Msgpack
  ]

  @max_timeout 3_600_000

  @typedoc """
  Options of `start_link/1` (and of `UroRecs.child_spec/1`); times in milliseconds:

    * `:endpoint` - `"ipc://PATH"` or `"tcp://HOST:PORT"`; default
      `"ipc:///run/uro-recs/client.sock"`.
    * `:model` - the model calls use when they name none.
    * `:timeout` - each call's default budget; default 1000, at most 3600000.
    * `:max_in_flight` - requests held at once; default 1024.
    * `:retry_attempts` (3, counting the first), `:retry_backoff` (5), `:retry_max_backoff`
      (250): retries of retryable errors.
    * `:reconnect_backoff` (10), `:reconnect_max_backoff` (1000), `:connect_timeout` (1000).
    * `:ping_interval` (1000), `:liveness_timeout` (3000).
    * `:max_reply_bytes` - the largest reply accepted; default 64 MiB.
    * `:codec` - the msgpack module (see `UroRecs.Msgpack`, "Swapping in msgpax").
    * `:name` - registers the process.
  """
  @type option :: {atom(), term()}

  defmodule Call do
    @moduledoc false
    # One caller's request over all its attempts. `entries` is the body's map entries
    # other than id and timeout_ms, already encoded; `count` how many there are.
    defstruct [:from, :entries, :count, :deadline, :timer, attempts: 0, sent?: false]
  end

  ## Public

  @doc "Starts a connection process; see the option list of `t:option/0`."
  @spec start_link([option()]) :: GenServer.on_start()
  def start_link(opts \\ []) do
    {name, opts} = Keyword.pop(opts, :name)
    gen_opts = if name, do: [name: name], else: []
    GenServer.start_link(__MODULE__, opts, gen_opts)
  end

  @doc false
  # The options with their defaults filled in and checked; used by `UroRecs` to build calls.
  @spec config([option()]) :: map()
  def config(opts) do
    config = Map.new(Keyword.merge(@defaults, opts))
    check_timeout!(config.timeout)
    {_kind, _address} = parse_endpoint!(config.endpoint)

    for key <- [:max_in_flight, :retry_attempts, :ping_interval, :liveness_timeout],
        not (is_integer(config[key]) and config[key] > 0),
        do: raise(ArgumentError, "#{key} must be a positive integer, got #{inspect(config[key])}")

    config
  end

  @doc false
  @spec check_timeout!(term()) :: pos_integer()
  def check_timeout!(timeout) when is_integer(timeout) and timeout in 1..@max_timeout,
    do: timeout

  def check_timeout!(timeout),
    do:
      raise(
        ArgumentError,
        "timeout must be an integer number of milliseconds in 1..#{@max_timeout}, " <>
          "got #{inspect(timeout)}"
      )

  @doc false
  # Sends one request (its encoded entries) and waits for its outcome: `{:ok, result_map}`
  # or `{:error, %UroRecs.Error{}}`. The process answers by `deadline` (monotonic ms).
  @spec request(GenServer.server(), iodata(), pos_integer(), integer()) ::
          {:ok, term()} | {:error, Error.t()}
  def request(client, entries, count, deadline) do
    # The process replies by the deadline; the margin only guards against a wedged process.
    wait = max(deadline - now(), 0) + 5_000
    GenServer.call(client, {:request, entries, count, deadline}, wait)
  catch
    :exit, reason ->
      {:error,
       Error.new(:unavailable, "the client process is not running: #{exit_reason(reason)}")}
  end

  @doc "How many requests this connection holds, and whether it is connected."
  @spec status(GenServer.server()) :: %{in_flight: non_neg_integer(), connected?: boolean()}
  def status(client), do: GenServer.call(client, :status)

  ## GenServer

  @impl true
  def init(opts) do
    config = config(opts)

    state = %{
      config: config,
      endpoint: parse_endpoint!(config.endpoint),
      socket: nil,
      phase: :disconnected,
      decoder: nil,
      calls: %{},
      next_id: 1,
      outbox: [],
      last_error: "not connected yet",
      reconnect_delay: config.reconnect_backoff,
      last_received: now(),
      dropped_replies: 0
    }

    {:ok, state, {:continue, :connect}}
  end

  @impl true
  def handle_continue(:connect, state), do: {:noreply, connect(state)}

  @impl true
  def handle_call({:request, entries, count, deadline}, from, state) do
    if map_size(state.calls) >= state.config.max_in_flight do
      message =
        "this connection already holds #{state.config.max_in_flight} requests " <>
          "(max_in_flight); add connections (pool_size) or send less"

      {:reply, {:error, Error.new(:overloaded, message)}, state}
    else
      id = state.next_id
      timer = :erlang.start_timer(deadline, self(), {:deadline, id}, abs: true)
      call = %Call{from: from, entries: entries, count: count, deadline: deadline, timer: timer}
      state = %{state | next_id: id + 1, calls: Map.put(state.calls, id, call)}
      {:noreply, send_call(state, id, call)}
    end
  end

  def handle_call(:status, _from, state),
    do: {:reply, %{in_flight: map_size(state.calls), connected?: state.phase == :open}, state}

  @impl true
  def handle_info(:flush, state), do: {:noreply, flush(state)}

  def handle_info({tag, socket, data}, %{socket: socket} = state) when tag in [:tcp] do
    state = %{state | last_received: now()}

    case ZMTP.feed(state.decoder, data) do
      {:ok, decoder, events} -> {:noreply, handle_events(events, %{state | decoder: decoder})}
      {:error, reason} -> {:noreply, disconnect(state, "protocol error: #{inspect(reason)}")}
    end
  end

  def handle_info({:tcp_passive, socket}, %{socket: socket} = state) do
    :ok = :inet.setopts(socket, active: 64)
    {:noreply, state}
  end

  def handle_info({:tcp_closed, socket}, %{socket: socket} = state),
    do: {:noreply, disconnect(state, "the broker closed the connection")}

  def handle_info({:tcp_error, socket, reason}, %{socket: socket} = state),
    do: {:noreply, disconnect(state, "connection error: #{inspect(reason)}")}

  def handle_info({tag, _old_socket, _}, state) when tag in [:tcp, :tcp_error],
    do: {:noreply, state}

  def handle_info({tag, _old_socket}, state) when tag in [:tcp_closed, :tcp_passive],
    do: {:noreply, state}

  def handle_info(:reconnect, %{phase: :disconnected} = state), do: {:noreply, connect(state)}
  def handle_info(:reconnect, state), do: {:noreply, state}

  def handle_info({:timeout, _timer, {:deadline, id}}, state) do
    case Map.pop(state.calls, id) do
      {nil, _} ->
        {:noreply, state}

      {call, calls} ->
        GenServer.reply(call.from, {:error, deadline_error(state, call)})
        {:noreply, %{state | calls: calls}}
    end
  end

  def handle_info({:retry, id}, state) do
    case state.calls do
      %{^id => %Call{sent?: false} = call} -> {:noreply, send_call(state, id, call)}
      _ -> {:noreply, state}
    end
  end

  def handle_info({:tick, socket}, %{socket: socket, phase: phase} = state)
      when phase in [:handshake, :open] do
    silent = now() - state.last_received

    cond do
      silent >= state.config.liveness_timeout ->
        what = if phase == :open, do: "sent nothing", else: "did not finish the handshake"
        {:noreply, disconnect(state, "the broker #{what} for #{silent} ms")}

      silent >= state.config.ping_interval ->
        ttl = min(div(state.config.liveness_timeout, 100), 65_535)
        schedule_tick(state)
        {:noreply, write(state, ZMTP.ping(ttl, ""))}

      true ->
        schedule_tick(state)
        {:noreply, state}
    end
  end

  def handle_info({:tick, _old_socket}, state), do: {:noreply, state}

  def handle_info(_unexpected, state), do: {:noreply, state}

  ## Connection

  defp connect(state) do
    {address, port, options} =
      case state.endpoint do
        {:ipc, path} -> {{:local, path}, 0, []}
        {:tcp, host, port} -> {host, port, [nodelay: true]}
      end

    options = [:binary, active: 64, packet: :raw, send_timeout: 5_000] ++ options

    case :gen_tcp.connect(address, port, options, state.config.connect_timeout) do
      {:ok, socket} ->
        decoder = ZMTP.new(max_frame_size: state.config.max_reply_bytes, max_frames: 2)

        state = %{
          state
          | socket: socket,
            decoder: decoder,
            phase: :handshake,
            last_received: now()
        }

        schedule_tick(state)

        case :gen_tcp.send(socket, [ZMTP.greeting(), ZMTP.ready_command()]) do
          :ok -> state
          {:error, reason} -> disconnect(state, "cannot greet the broker: #{inspect(reason)}")
        end

      {:error, reason} ->
        reason = "cannot connect to #{state.config.endpoint}: #{:inet.format_error(reason)}"
        schedule_reconnect(%{state | last_error: reason})
    end
  end

  defp disconnect(state, why) do
    :gen_tcp.close(state.socket)
    # Whatever was written and not answered is lost with the connection: send it again.
    calls = Map.new(state.calls, fn {id, call} -> {id, %{call | sent?: false}} end)

    state = %{
      state
      | socket: nil,
        decoder: nil,
        phase: :disconnected,
        outbox: [],
        calls: calls,
        last_error: why
    }

    schedule_reconnect(state)
  end

  defp schedule_reconnect(state) do
    delay = state.reconnect_delay
    Process.send_after(self(), :reconnect, jitter(delay))
    %{state | reconnect_delay: min(delay * 2, state.config.reconnect_max_backoff)}
  end

  defp schedule_tick(state),
    do: Process.send_after(self(), {:tick, state.socket}, min(state.config.ping_interval, 1_000))

  ## Events from the broker

  defp handle_events([], state), do: state

  defp handle_events([event | rest], state) do
    case handle_event(event, state) do
      {:stop, state} -> state
      state -> handle_events(rest, state)
    end
  end

  defp handle_event({:greeting, _}, state), do: state

  defp handle_event({:ready, _properties}, state) do
    state = %{state | phase: :open, reconnect_delay: state.config.reconnect_backoff}

    state.calls
    |> Enum.sort_by(fn {id, _} -> id end)
    |> Enum.reduce(state, fn {id, call}, state -> send_call(state, id, call) end)
  end

  defp handle_event({:ping, _ttl, context}, state), do: write(state, ZMTP.pong(context))
  defp handle_event({:pong, _}, state), do: state

  defp handle_event({:error_command, reason}, state),
    do: {:stop, disconnect(state, "the broker refused the connection: #{reason}")}

  defp handle_event({:message, ["", body]}, state), do: handle_reply(body, state)

  defp handle_event({:message, frames}, state),
    do: {:stop, disconnect(state, "unexpected message of #{length(frames)} frames")}

  defp handle_reply(body, state) do
    case state.config.codec.decode(body) do
      {:ok, %{"id" => id} = reply} when is_integer(id) ->
        case Map.pop(state.calls, id) do
          {nil, _} -> %{state | dropped_replies: state.dropped_replies + 1}
          {call, calls} -> outcome(reply, id, call, %{state | calls: calls})
        end

      _undecodable_or_unmatched ->
        %{state | dropped_replies: state.dropped_replies + 1}
    end
  end

  defp outcome(%{"ok" => true, "result" => result}, _id, call, state),
    do: finish(call, {:ok, result}, state)

  defp outcome(%{"ok" => false, "error" => error}, id, call, state) do
    error = Error.from_wire(error)

    case retry_delay(error, call, state.config) do
      nil ->
        finish(call, {:error, error}, state)

      delay ->
        Process.send_after(self(), {:retry, id}, delay)
        %{state | calls: Map.put(state.calls, id, %{call | sent?: false})}
    end
  end

  defp outcome(reply, _id, call, state) do
    message = "malformed reply: #{inspect(reply, limit: 8, printable_limit: 100)}"
    finish(call, {:error, Error.new(:internal, message)}, state)
  end

  defp finish(call, outcome, state) do
    :erlang.cancel_timer(call.timer, async: true, info: false)
    GenServer.reply(call.from, outcome)
    state
  end

  defp retry_delay(%Error{retry?: true}, call, config) do
    if call.attempts < config.retry_attempts do
      ceiling =
        min(config.retry_backoff * Integer.pow(2, call.attempts - 1), config.retry_max_backoff)

      delay = jitter(ceiling)
      if now() + delay < call.deadline, do: delay
    end
  end

  defp retry_delay(_error, _call, _config), do: nil

  ## Writing

  # Queues the request on an open connection; on any other, it waits for the next READY.
  defp send_call(%{phase: :open} = state, id, call) do
    timeout_ms = call.deadline - now()

    if timeout_ms <= 0 do
      state
    else
      body = [
        map_header(call.count + 2),
        <<0xA2, "id">>,
        Msgpack.encode!(id),
        <<0xAA, "timeout_ms">>,
        Msgpack.encode!(timeout_ms),
        call.entries
      ]

      call = %{call | sent?: true, attempts: call.attempts + 1}
      state = %{state | calls: Map.put(state.calls, id, call)}
      write(state, ZMTP.encode_request(body))
    end
  end

  defp send_call(state, _id, _call), do: state

  defp write(%{outbox: []} = state, bytes) do
    send(self(), :flush)
    %{state | outbox: [bytes]}
  end

  defp write(state, bytes), do: %{state | outbox: [bytes | state.outbox]}

  defp flush(%{outbox: []} = state), do: state
  defp flush(%{socket: nil} = state), do: %{state | outbox: []}

  defp flush(state) do
    case :gen_tcp.send(state.socket, Enum.reverse(state.outbox)) do
      :ok -> %{state | outbox: []}
      {:error, reason} -> disconnect(state, "send failed: #{inspect(reason)}")
    end
  end

  ## Helpers

  defp deadline_error(%{phase: :open}, call) do
    Error.new(:deadline_exceeded, "no reply within the call's timeout (#{attempts(call)})")
  end

  defp deadline_error(state, _call) do
    Error.new(
      :unavailable,
      "not connected to the broker within the call's timeout: #{state.last_error}"
    )
  end

  defp attempts(%Call{attempts: 1}), do: "1 attempt"
  defp attempts(%Call{attempts: n}), do: "#{n} attempts"

  defp map_header(n) when n < 16, do: <<0x80 + n>>
  defp map_header(n), do: <<0xDE, n::16>>

  defp jitter(ceiling) when ceiling <= 1, do: 1
  defp jitter(ceiling), do: div(ceiling, 2) + :rand.uniform(ceiling - div(ceiling, 2))

  defp now, do: System.monotonic_time(:millisecond)

  defp exit_reason({reason, {GenServer, :call, _}}), do: inspect(reason)
  defp exit_reason(reason), do: inspect(reason)

  @doc false
  @spec parse_endpoint!(term()) :: {:ipc, binary()} | {:tcp, charlist(), :inet.port_number()}
  def parse_endpoint!("ipc://" <> path) when byte_size(path) > 0, do: {:ipc, path}

  def parse_endpoint!("tcp://" <> address = endpoint) do
    with [host, port] <- String.split(address, ":", parts: 2),
         {port, ""} when port in 1..65_535 <- Integer.parse(port),
         true <- host != "" do
      {:tcp, String.to_charlist(host), port}
    else
      _ -> raise ArgumentError, "endpoint #{inspect(endpoint)}: expected tcp://HOST:PORT"
    end
  end

  def parse_endpoint!(endpoint),
    do:
      raise(
        ArgumentError,
        "endpoint must be \"ipc://PATH\" or \"tcp://HOST:PORT\", got #{inspect(endpoint)}"
      )
end
