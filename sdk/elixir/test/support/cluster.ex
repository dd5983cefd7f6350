defmodule UroRecs.TestCluster do
  @moduledoc """
  The real sidecar for integration tests: models trained and a broker and workers started
  through the Python CLI (`python -m uro_recs.app.cli`), as separate OS processes that tests can
  signal. The Python interpreter is `URO_RECS_PYTHON` (the Makefile points it at the
  project's virtualenv); the repository root is two levels above sdk/elixir.

  Processes are started through `sh -c 'exec ...'` with their output in log files, so they
  outlive the port that started them; `stop/1` kills them all.
  """

  @repo_root Path.expand("../../../..", __DIR__)
  @version "v1"

  defstruct [:dir, :config, :endpoint, :control, :broker, workers: %{}]

  @type t :: %__MODULE__{}

  @spec python() :: binary() | nil
  def python, do: System.get_env("URO_RECS_PYTHON")

  @spec repo_root() :: binary()
  def repo_root, do: @repo_root

  @doc """
  Trains `models` (`%{name => kind}`) on generated interactions, writes a config with
  `broker` settings, starts the broker and `workers` (`%{name => count}`), and waits until
  every worker has announced itself.
  """
  @spec start(map(), map(), keyword()) :: t()
  def start(models, workers, broker \\ []) do
    dir = Path.join(System.tmp_dir!(), "ur-ex-#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    config = Path.join(dir, "uro-recs.toml")
    File.write!(config, config_text(dir, Map.keys(models), broker))
    csv = Path.join(dir, "interactions.csv")
    File.write!(csv, interactions_csv())

    models
    |> Enum.map(fn {name, kind} ->
      Task.async(fn ->
        # --force: the tests need these exact models served, whatever their scores.
        args =
          ["train", "--model", name, "--kind", kind, "--csv", csv, "--version", @version] ++
            ["--publish", "--force"]

        {out, status} = System.cmd(python(), cli(config, args), stderr_to_stdout: true)
        if status != 0, do: raise("training #{name} failed:\n#{out}")
      end)
    end)
    |> Task.await_many(300_000)

    cluster = %__MODULE__{
      dir: dir,
      config: config,
      endpoint: "ipc://" <> Path.join([dir, "run", "client.sock"]),
      control: "ipc://" <> Path.join([dir, "run", "control.sock"])
    }

    cluster = start_broker(cluster)

    cluster =
      Enum.reduce(workers, cluster, fn {model, count}, cluster ->
        Enum.reduce(1..count, cluster, fn _, cluster -> start_worker(cluster, model) end)
      end)

    try do
      wait_for_workers(cluster, workers)
      cluster
    rescue
      # The test's on_exit never learns of a cluster that failed to start: stop its
      # processes here, and keep its directory for the logs the error points at.
      error ->
        kill_all(cluster)
        reraise error, __STACKTRACE__
    end
  end

  @spec start_broker(t()) :: t()
  def start_broker(cluster), do: %{cluster | broker: spawn_cli(cluster, ["broker"], "broker")}

  @spec start_worker(t(), binary()) :: t()
  def start_worker(cluster, model) do
    pid = spawn_cli(cluster, ["worker", "--model", model], "worker-#{model}")
    %{cluster | workers: Map.update(cluster.workers, model, [pid], &(&1 ++ [pid]))}
  end

  @doc "Sends `signal` (\"KILL\", \"TERM\", \"STOP\", \"CONT\") to an OS process."
  @spec signal(pos_integer(), binary()) :: :ok
  def signal(os_pid, signal) do
    {_, 0} = System.cmd("kill", ["-#{signal}", Integer.to_string(os_pid)])
    :ok
  end

  @spec alive?(pos_integer()) :: boolean()
  def alive?(os_pid) do
    {_, status} = System.cmd("kill", ["-0", Integer.to_string(os_pid)], stderr_to_stdout: true)
    status == 0 and not zombie?(os_pid)
  end

  # A killed child of the port's shell may linger as a zombie until reaped.
  defp zombie?(os_pid) do
    case File.read("/proc/#{os_pid}/stat") do
      {:ok, stat} -> stat |> String.split(") ") |> List.last() |> String.starts_with?("Z")
      {:error, _} -> true
    end
  end

  @doc "Waits (up to `timeout` ms) until the OS process has exited."
  @spec wait_exit(pos_integer(), non_neg_integer()) :: :ok
  def wait_exit(os_pid, timeout \\ 30_000) do
    wait_until(timeout, fn -> not alive?(os_pid) end, fn -> "process #{os_pid} did not exit" end)
  end

  @doc "Waits until `info` reports `counts` live workers per model, via a throwaway pool."
  @spec wait_for_workers(t(), map(), non_neg_integer()) :: :ok
  def wait_for_workers(cluster, counts, timeout \\ 120_000) do
    name = :"wait_#{System.unique_integer([:positive])}"
    {:ok, pool} = UroRecs.start_link(name: name, endpoint: cluster.endpoint)

    try do
      wait_until(
        timeout,
        fn ->
          case UroRecs.info(name, timeout: 500) do
            {:ok, infos} ->
              live =
                Enum.reduce(infos, %{}, fn info, live ->
                  Map.update(live, info.name, info.workers, &(&1 + info.workers))
                end)

              Process.put(:last_seen, live)
              Enum.all?(counts, fn {model, count} -> Map.get(live, model, 0) == count end)

            {:error, error} ->
              Process.put(:last_seen, error)
              false
          end
        end,
        fn ->
          "workers #{inspect(counts)} did not all announce themselves (last seen: " <>
            "#{inspect(Process.get(:last_seen))}); logs in #{cluster.dir}"
        end
      )
    after
      Process.unlink(pool)
      Process.exit(pool, :shutdown)
    end
  end

  @spec stop(t()) :: :ok
  def stop(cluster) do
    kill_all(cluster)
    # URO_RECS_KEEP_LOGS=1 keeps the directory (logs, config, store) for a post-mortem.
    if System.get_env("URO_RECS_KEEP_LOGS") in [nil, ""], do: File.rm_rf(cluster.dir)
    :ok
  end

  defp kill_all(cluster) do
    pids = [cluster.broker | Enum.flat_map(cluster.workers, fn {_, pids} -> pids end)]
    for pid <- pids, alive?(pid), do: signal(pid, "KILL")
  end

  @doc "Runs tests/sdk_answers.py: the Python SDK's answers to `requests` (msgpack both ways)."
  @spec python_answers(t(), [map()]) :: [term()]
  def python_answers(cluster, requests) do
    input = Path.join(cluster.dir, "requests-#{System.unique_integer([:positive])}.msgpack")
    File.write!(input, UroRecs.Msgpack.encode!(requests))
    args = ["-m", "tests.sdk_answers", cluster.endpoint, input]
    {out, 0} = System.cmd(python(), args, cd: @repo_root)
    UroRecs.Msgpack.decode!(out)
  end

  defp wait_until(timeout, done?, message) do
    deadline = System.monotonic_time(:millisecond) + timeout

    Stream.repeatedly(fn ->
      cond do
        done?.() -> :done
        System.monotonic_time(:millisecond) > deadline -> raise message.()
        true -> Process.sleep(50)
      end
    end)
    |> Enum.find(&(&1 == :done))

    :ok
  end

  defp cli(config, args), do: ["-m", "uro_recs.app.cli", "--config", config | args]

  defp spawn_cli(cluster, args, log_name) do
    log = Path.join(cluster.dir, "#{log_name}-#{System.unique_integer([:positive])}.log")

    # The shell prints its pid, which `exec` hands on to the CLI, then closes the port's pipe.
    script = ~s(echo $$; exec "$0" "$@" >>"#{log}" 2>&1 </dev/null)

    port =
      Port.open({:spawn_executable, "/bin/sh"}, [
        :binary,
        args: ["-c", script, python() | cli(cluster.config, args)],
        cd: @repo_root
      ])

    receive do
      {^port, {:data, line}} -> line |> String.trim() |> String.to_integer()
    after
      10_000 -> raise "#{inspect(args)} did not start"
    end
  end

  defp config_text(dir, models, broker) do
    broker_lines = for {key, value} <- broker, do: "#{key} = #{value}"

    Enum.join(
      [
        ~s(run_dir = "#{Path.join(dir, "run")}"),
        ~s(store = "#{Path.join(dir, "store")}"),
        ~s(log_format = "json"),
        "[broker]" | broker_lines
      ] ++
        ["[worker]", "threads = 1"] ++
        Enum.flat_map(models, fn name -> ["[[models]]", ~s(name = "#{name}")] end),
      "\n"
    ) <> "\n"
  end

  @doc """
  The generated training data: 300 users, 400 items with skewed popularity, each item of one
  kind (DeepFM trains on it as a feature), seed fixed.
  """
  @spec interactions_csv() :: binary()
  def interactions_csv do
    :rand.seed(:exsss, {7, 11, 13})

    rows =
      for user <- 1..300,
          count = 15 + :rand.uniform(30),
          item <- Enum.uniq(for(_ <- 1..count, do: popular_item())),
          do: {"user-#{user}", "item-#{item}"}

    lines =
      rows
      |> Enum.with_index()
      |> Enum.map(fn {{user, item}, i} ->
        kind = Enum.at(["avatar", "map", "prop"], rem(:erlang.phash2(item), 3))
        "#{user},#{item},1.0,#{1_700_000_000 + i},#{kind}\n"
      end)

    IO.iodata_to_binary(["user,item,label,time,item_kind\n" | lines])
  end

  # Item ranks skewed towards the front, like real popularity.
  defp popular_item, do: trunc(400 * :math.pow(:rand.uniform(), 2)) + 1
end
