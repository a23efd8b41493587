-- The engine's --mysql-cdc reads MariaDB's binlog as a replica would: it needs these two
-- privileges besides SELECT on the spendflow database (the image's MARIADB_USER has that).
GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'spendflow'@'%';
FLUSH PRIVILEGES;
